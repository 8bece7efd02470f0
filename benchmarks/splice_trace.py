"""Where the spliced KL comes from: per test token, for methods fitted at one hook.

For each method (fitted on the train split as a job fits it, seed 42) the test split's
tokens are reconstructed (decode(encode(x))), and the script reports:

- pooled `fvu` beside the mean per-token explained variance (the reconstruction task's
  two figures) and the median per-token FVU;
- by position in the sentence (1 = the first real token after BOS) and by the token's
  activation norm (bands of the norm's quantiles): the tokens' share of the variance
  (FVU's denominator) and of the squared error, the FVU inside the band, and the mean
  spliced KL at those positions;
- how many tokens carry half and 90% of the squared error;
- three splices, each the mean KL(P_clean || P_spliced) over the real tokens' next-token
  distributions: every real token replaced (what the task does; BOS keeps its own
  activation), every real token but the first (is the first token's error the cause?),
  and every token including BOS (what keeping BOS saves: SAEBench keeps special tokens'
  activations, SAELens's `exclude_special_tokens` leaves them out of the metrics).

    python benchmarks/splice_trace.py [--hook resid_post] [--layer 12] [--methods snmf,topk_sae]
        [--json out.json]

Progress bars go to stderr. Timing is not measured, so other work beside it is harmless.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch

from bench.activations.extraction import extract, padded_batches, tokenize
from bench.data.datasets import load
from bench.fit.encodings import Encodings
from bench.models import load_model
from bench.models.sources import embedded_model
from featbench.methods.snmf import SNMF
from featbench.methods.topk_sae import TopKSAE
from featbench.tasks.reconstruction import splice, token_errors

METHODS = {"snmf": lambda: SNMF(seed=42), "topk_sae": lambda: TopKSAE(seed=42)}
POSITIONS = [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 10**6)]
SPLICES = ("every real token", "all but the first real token", "BOS too")


def trace(model, ds, acts, features) -> dict:
    test = ds.indices("test")
    sub = acts.subset(test)
    enc = Encodings(features, acts, len(ds))
    x, x_hat = sub.acts.float(), enc.decoded(enc.rows(test))
    err, dev, explained = token_errors(x, x_hat)
    norm, pos = x.norm(dim=1), sub.positions
    kl = splice_kl(model, ds, sub, test, features, x_hat)
    out = {
        "fvu": float(err.sum() / dev.sum()),
        "explained_variance_per_token": float(explained.mean()),
        "median_fvu_per_token": float((err / dev).median()),
        "kl": {name: float(values[~values.isnan()].mean()) for name, values in kl.items()},
    }
    every = kl[SPLICES[0]]

    def band(mask: torch.Tensor) -> dict:
        return {"tokens": int(mask.sum()), "mean_norm": float(norm[mask].mean()),
                "share_of_variance": float(dev[mask].sum() / dev.sum()),
                "share_of_error": float(err[mask].sum() / err.sum()),
                "fvu": float(err[mask].sum() / dev[mask].sum()),
                "kl": float(every[mask].mean())}  # fmt: skip

    out["by_position"] = {f"{a}" if a == b else f"{a}-{b if b < 10**6 else ''}":
                          band((pos >= a) & (pos <= b)) for a, b in POSITIONS}  # fmt: skip
    q50, q90, q99 = torch.quantile(norm, torch.tensor([0.5, 0.9, 0.99])).tolist()
    bands = {"<= median": norm <= q50, "median-q90": (norm > q50) & (norm <= q90),
             "q90-q99": (norm > q90) & (norm <= q99), "> q99": norm > q99,
             "> 10x median": norm > 10 * q50}  # fmt: skip
    out["by_norm"] = {name: band(mask) for name, mask in bands.items() if mask.any()}
    share = err.sort(descending=True).values.cumsum(0) / err.sum()
    out["tokens"] = len(err)
    out["tokens_holding_half_the_error"] = int((share < 0.5).sum()) + 1
    out["tokens_holding_90pct_of_the_error"] = int((share < 0.9).sum()) + 1
    massive = sorted(set(sub.token_ids[norm > 10 * q50].tolist()))
    out["massive_tokens"] = [model.tokenizer.decode([t]) for t in massive]
    return out


@torch.inference_mode()
def splice_kl(model, ds, sub, test, features, x_hat) -> dict[str, torch.Tensor]:
    """Per test row, the KL at its position under each splice of SPLICES."""
    token_ids, _ = tokenize(model, [ds.sentences[i] for i in test], 256)
    ids = sub.sentence_ids
    start = torch.searchsorted(ids, torch.as_tensor(test), side="left").tolist()
    stop = torch.searchsorted(ids, torch.as_tensor(test), side="right").tolist()
    out = {name: torch.full((len(sub),), float("nan")) for name in SPLICES}
    hook = features.hook
    for batch, tokens, real in padded_batches(model, token_ids, 1024):
        rows = torch.cat([torch.arange(start[i], stop[i]) for i in batch])
        first = torch.cat([torch.arange(stop[i] - start[i]) == 0 for i in batch])
        clean, cache = model.run_with_cache(tokens, names_filter=hook)
        clean = clean.log_softmax(-1)
        bos = cache[hook][:, 0]  # BOS's own activation, reconstructed for the third splice
        bos_hat = features.decode(features.encode(bos.float())).to(bos.dtype)
        keep_first = real.clone()
        keep_first[:, 1] = False
        with_bos = real.clone()
        with_bos[:, 0] = True
        replacements = {
            SPLICES[0]: (x_hat[rows], real),
            SPLICES[1]: (x_hat[rows][~first], keep_first),
            SPLICES[2]: (_interleave(bos_hat, x_hat, batch, start, stop), with_bos),
        }
        for name, (replacement, mask) in replacements.items():
            fn = partial(splice, replacement=replacement, mask=mask)
            spliced = model.run_with_hooks(tokens, fwd_hooks=[(hook, fn)]).log_softmax(-1)
            kl = (clean.exp() * (clean - spliced)).sum(-1)
            out[name][rows] = kl[real].float()
    return out


def _interleave(bos_hat, x_hat, batch, start, stop) -> torch.Tensor:
    """Row-major replacement for a mask with BOS set: each sentence's BOS, then its rows."""
    return torch.cat([torch.cat([bos_hat[j : j + 1], x_hat[start[i] : stop[i]]])
                      for j, i in enumerate(batch)])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default="resid_post")
    parser.add_argument("--layer", type=int, default=None, help="default: the model's own")
    parser.add_argument("--methods", default="snmf,topk_sae")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    entry = embedded_model(args.model)
    lm = load_model(args.model, n_ctx=entry.n_ctx)
    layer = entry.default_layer if args.layer is None else args.layer
    ds = load()
    acts = extract(lm.model, ds, layer, args.hook, model_fingerprint=lm.fingerprint)
    result = {"model": args.model, "layer": layer, "hook": args.hook, "methods": {}}
    for name in args.methods.split(","):
        features = METHODS[name]().fit(acts.subset(ds.indices("train")))
        result["methods"][name] = trace(lm.model, ds, acts, features)
        print(json.dumps({name: result["methods"][name]}, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
