"""Activation extraction speed against the model's plain forward pass (not a test).

    python benchmarks/extraction.py [--layer 12] [--repeats 3] [--json out.json]

On the embedded model and the shipped dataset, measured side by side in one
run and interleaved (extract, forward, extract, forward, ...) so that load
from other processes hits both alike:

- `bench.activations.extraction.extract(..., use_cache=False)`: tokenization, length
  batching, the forward pass up to the hook's layer, copying the hook's rows
  out, the finiteness check and the reordering into dataset order. The cache is
  off, so every repeat does the full work (nothing is read from or written to
  disk);
- the same model's plain forward pass on exactly the same padded batches,
  stopped at the same layer (`stop_at_layer=layer + 1`, no hook): the cost of
  the computation alone. The ratio forward_seconds / extract_seconds is the
  target (>= 0.9: extraction adds at most ~10% to the forward pass);
- for context, once, the full forward pass to the logits on the same batches
  (what a naive extraction that runs the whole model would pay).

Tokens/s count real tokens (no BOS, no pads), the rows extraction keeps; the
median over repeats is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench.activations.extraction import extract, padded_batches, tokenize
from bench.data.datasets import load
from bench.models import load_model


def forward_seconds(model, batches: list[torch.Tensor], stop_at_layer: int | None) -> float:
    """Seconds for a hook-free forward pass over pre-built padded batches."""
    start = time.perf_counter()
    with torch.inference_mode():
        for tokens in batches:
            if stop_at_layer is None:
                model(tokens, return_type="logits")
            else:
                model(tokens, stop_at_layer=stop_at_layer)
    return time.perf_counter() - start


def threads_probe(model, batch: torch.Tensor) -> dict:
    """One tiny and one batch forward at 1 thread and at every CPU: on a shared
    machine, torch's threads wait for each other when another process holds a core."""
    configured, out = torch.get_num_threads(), {}
    tiny = model.to_tokens("I think that")
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        tiny_s = min(forward_seconds(model, [tiny], None) for _ in range(3))
        out[threads] = {
            "tiny_ms": tiny_s * 1e3,
            "batch_tokens": batch.numel(),
            "batch_seconds": forward_seconds(model, [batch], None),
        }
    torch.set_num_threads(configured)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layer", type=int, default=12, help="block whose mlp_post is extracted")
    parser.add_argument("--hook", default="mlp_post")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--max-sentences", type=int, default=None, help="per concept (quick runs)")
    parser.add_argument(
        "--batch-tokens", type=int, default=4096, help="as activations.batch_tokens"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    lm = load_model("smollm2-135m", device="cpu")
    model = lm.model
    ds = load(max_per_concept=args.max_sentences, max_neutral=args.max_sentences)
    token_ids, _ = tokenize(model, list(ds.sentences))
    batches = [tokens for _, tokens, _ in padded_batches(model, token_ids, args.batch_tokens)]
    padded = sum(t.numel() for t in batches)

    def run_extract() -> tuple[float, int]:
        start = time.perf_counter()
        acts = extract(
            model,
            ds,
            args.layer,
            args.hook,
            model_fingerprint=lm.fingerprint,
            batch_tokens=args.batch_tokens,
            use_cache=False,
        )
        return time.perf_counter() - start, len(acts)

    run_extract()  # warm-up: allocator, thread pool, tokenizer
    forward_seconds(model, batches[:1], args.layer + 1)
    times: dict[str, list[float]] = {"extract": [], "forward_to_layer": []}
    tokens = 0
    for _ in range(args.repeats):
        seconds, tokens = run_extract()
        times["extract"].append(seconds)
        times["forward_to_layer"].append(forward_seconds(model, batches, args.layer + 1))
    times["forward_full"] = [forward_seconds(model, batches, None)]  # context only: once
    probe = threads_probe(model, batches[-1])
    median = {name: statistics.median(values) for name, values in times.items()}
    rate = {name: tokens / seconds for name, seconds in median.items()}
    ratio = median["forward_to_layer"] / median["extract"]

    print(f"# extraction, {len(ds)} sentences, {tokens:,} tokens ({padded:,} padded) in "
          f"{len(batches)} batches, layer {args.layer} {args.hook}, {args.repeats} repeats, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"extract (no cache)         : {rate['extract']:9.0f} tok/s ({median['extract']:.2f} s)")
    print(f"plain forward to layer {args.layer + 1:<3} : {rate['forward_to_layer']:9.0f} tok/s "
          f"({median['forward_to_layer']:.2f} s)")  # fmt: skip
    print(f"full forward to logits     : {rate['forward_full']:9.0f} tok/s "
          f"({median['forward_full']:.2f} s)")  # fmt: skip
    print(f"ratio extract / forward to the same layer: {ratio:.2f} (target >= 0.9); "
          f"extract / full forward: {median['forward_full'] / median['extract']:.2f}")  # fmt: skip

    for threads, p in probe.items():
        print(f"torch threads {threads}: one 4-token forward {p['tiny_ms']:.0f} ms, "
              f"one batch ({p['batch_tokens']} padded tokens) {p['batch_seconds']:.2f} s")  # fmt: skip

    if args.json:
        result = {
            "threads": torch.get_num_threads(),
            "threads_probe": probe,
            "sentences": len(ds),
            "tokens": tokens,
            "padded_tokens": padded,
            "batches": len(batches),
            "layer": args.layer,
            "hook": args.hook,
            "repeats": args.repeats,
            "seconds": times,
            "tokens_per_second": rate,
            "ratio_vs_forward_to_layer": ratio,
            "ratio_vs_full_forward": median["forward_full"] / median["extract"],
        }
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
