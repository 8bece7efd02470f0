"""Activation extraction at one hook, cached on disk.

`extract` tokenizes every sentence (BOS prepended when the model expects it),
runs batches of similar length through the model up to the hook's layer only
(`stop_at_layer`), keeps the hook's output for real tokens (pad and BOS rows
are dropped) and returns an `ActivationSet` aligned with token ids, sentence
ids and positions.

The result is cached as one safetensors file whose name is a hash of what
determines it: model fingerprint, hook, layer, the dataset's content hash,
the tokenizer settings and the storage dtype. A second run with the same key
does no forward pass. Entries are written atomically under a lock (parallel
jobs of a sweep build each entry once), and an entry that fails its checksum
is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from bench.activations.set import ActivationSet
from bench.core.dtypes import torch_dtype
from bench.core.hooks import hook_name
from bench.core.storage import (
    atomic_write,
    cache_dir,
    entry_lock,
    is_verified,
    mark_verified,
    sha256_json,
)
from bench.data.datasets import ConceptDataset

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the checksum covers every tensor


def tokenize(
    model: Any, sentences: list[str], max_length: int | None = None
) -> tuple[list[list[int]], dict]:
    """Token ids per sentence (BOS first when the model prepends one) and the
    settings that determine them (part of the cache key)."""
    tokenizer = model.tokenizer
    prepend_bos = bool(bos_offset(model))
    limit = min(max_length or model.cfg.n_ctx, model.cfg.n_ctx)
    ids, truncated = [], 0
    for sentence in sentences:
        tokens = tokenizer.encode(sentence, add_special_tokens=False)
        tokens = ([tokenizer.bos_token_id] if prepend_bos else []) + tokens
        if len(tokens) > limit:
            truncated += 1
            tokens = tokens[:limit]
        ids.append(tokens)
    if truncated:
        log.warning(
            "%d of %d sentences were longer than %d tokens and were truncated",
            truncated,
            len(sentences),
            limit,
        )
    settings = {
        "prepend_bos": prepend_bos,
        "bos_token_id": tokenizer.bos_token_id,
        "max_length": limit,
        "vocab_hash": _vocab_hash(tokenizer),
        "truncated": truncated,
    }
    return ids, settings


def _vocab_hash(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def extract(
    model: Any,
    dataset: ConceptDataset,
    layer: int,
    hook: str,
    *,
    model_fingerprint: str,
    batch_tokens: int = 4096,
    max_length: int | None = None,
    dtype: str = "float32",
    use_cache: bool = True,
) -> ActivationSet:
    """Activations of every dataset sentence at `hook` of `layer` (cached)."""
    name = hook_name(layer, hook, model.cfg.n_layers)
    storage = torch_dtype(dtype, "activations.dtype")
    token_ids, settings = tokenize(model, list(dataset.sentences), max_length)
    key = sha256_json(
        {
            "format": FORMAT_VERSION,
            "model": model_fingerprint,
            "hook": name,
            "dataset": dataset.content_hash,
            "tokenizer": {k: v for k, v in settings.items() if k != "truncated"},
            "dtype": dtype,
        }
    )[:24]
    path = cache_dir() / "activations" / f"{name}-{key}.safetensors"
    labels = list(dataset.labels)
    if use_cache:
        with entry_lock(path):
            acts = _read_entry(path, labels)
            if acts is not None:
                log.info("activations at %s: cache hit (%s, %d tokens)", name, path.name, len(acts))
            else:
                acts = _forward(model, token_ids, name, layer, batch_tokens, storage, labels)
                _write_entry(path, acts)
    else:
        acts = _forward(model, token_ids, name, layer, batch_tokens, storage, labels)
    acts.meta["truncated_sentences"] = settings["truncated"]  # counted, as the warning says
    return acts


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Sentence indices grouped by similar length, each batch <= batch_tokens padded tokens."""
    order = np.argsort(lengths, kind="stable")[::-1]
    batches, current, longest = [], [], 0
    for i in order.tolist():
        longest_if = max(longest, lengths[i])
        if current and longest_if * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest_if = [], lengths[i]
        current.append(i)
        longest = longest_if
    if current:
        batches.append(current)
    return batches


def padded_batches(
    model: Any, token_ids: list[list[int]], batch_tokens: int
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(sentence indices, right-padded tokens, real-token mask) per length batch.

    The mask is False on pads and on the BOS position: the rows featbench
    keeps as activations and splices into. Right padding under a causal
    mask: real tokens never see the pads.
    """
    pad = model.tokenizer.pad_token_id
    pad = pad if pad is not None else 0
    skip = bos_offset(model)
    lengths = [len(t) for t in token_ids]
    for batch in length_batches(lengths, batch_tokens):
        width = max(lengths[i] for i in batch)
        tokens = torch.full((len(batch), width), pad, dtype=torch.long)
        real = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, i in enumerate(batch):
            tokens[row, : lengths[i]] = torch.tensor(token_ids[i])
            real[row, skip : lengths[i]] = True
        yield batch, tokens, real


def bos_offset(model: Any) -> int:
    """1 when sentences start with a BOS token (see `tokenize`), else 0."""
    return int(bool(model.cfg.default_prepend_bos) and model.tokenizer.bos_token_id is not None)


@torch.inference_mode()
def _forward(model, token_ids, name, layer, batch_tokens, dtype, labels) -> ActivationSet:
    device = model.cfg.device
    skip = bos_offset(model)
    lengths = [len(t) for t in token_ids]
    total = sum(lengths) - skip * len(lengths)
    captured: dict[str, torch.Tensor] = {}

    def grab(activation: torch.Tensor, hook: Any) -> None:
        captured["x"] = activation

    chunks, ids, sents, positions = [], [], [], []
    with tqdm(total=total, desc=f"extract {name}", unit="tok", leave=False) as bar:
        for batch, tokens, real in padded_batches(model, token_ids, batch_tokens):
            model.run_with_hooks(
                tokens.to(device),
                fwd_hooks=[(name, grab)],
                stop_at_layer=layer + 1,
                return_type=None,
            )
            # One gather per batch (row by row, positions ascending), not one per sentence.
            rows = captured.pop("x")[real.to(device)]
            where = real.nonzero()
            _check_finite(rows, name, [batch[r] for r in where[:, 0].tolist()], where[:, 1])
            chunks.append(rows.to("cpu", dtype))
            ids.append(tokens[real])
            sents.append(torch.tensor(batch, dtype=torch.long)[where[:, 0]])
            positions.append(where[:, 1])
            bar.update(len(rows))
    order = torch.argsort(torch.cat(sents), stable=True)  # rows in dataset order
    return ActivationSet(
        acts=torch.cat(chunks)[order].contiguous(),
        token_ids=torch.cat(ids)[order],
        sentence_ids=torch.cat(sents)[order],
        positions=torch.cat(positions)[order],
        hook=name,
        sentence_labels=labels,
    )


def _check_finite(
    rows: torch.Tensor, name: str, sentences: list[int], positions: torch.Tensor
) -> None:
    """Raise naming the hook, sentence and token position of the first NaN/Inf row."""
    bad = (~torch.isfinite(rows)).any(dim=-1).nonzero()
    if len(bad):
        first = int(bad[0])
        raise FloatingPointError(
            f"NaN/Inf activation at {name}, sentence {sentences[first]}, "
            f"token position {int(positions[first])}"
        )


TENSORS = ("acts", "token_ids", "sentence_ids", "positions")


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every stored tensor's bytes, in a fixed order."""
    digest = hashlib.sha256()
    for name in TENSORS:
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write_entry(path: Path, acts: ActivationSet) -> None:
    tensors = {name: getattr(acts, name).contiguous() for name in TENSORS}
    metadata = {"hook": acts.hook, "format": str(FORMAT_VERSION), "sha256": _digest(tensors)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    mark_verified(path, metadata["sha256"])  # just written from these tensors
    log.info("activations at %s cached: %s (%d tokens x %d)", acts.hook, path, len(acts), acts.d)


def _read_entry(path: Path, labels: list[str]) -> ActivationSet | None:
    """The cached entry, or None when absent, unreadable or failing its checksum."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        checksum = metadata.get("sha256")
        if not (checksum and is_verified(path, checksum)):  # hash only a new or changed file
            if checksum != _digest(tensors):
                raise ValueError("checksum mismatch")
            mark_verified(path, checksum)
        return ActivationSet(
            acts=tensors["acts"],
            token_ids=tensors["token_ids"],
            sentence_ids=tensors["sentence_ids"],
            positions=tensors["positions"],
            hook=metadata["hook"],
            sentence_labels=labels,
        )
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as err:
        log.warning("activation cache entry %s is corrupt (%s); rebuilding it", path.name, err)
        return None
