"""Reconstruction faithfulness: how much of the activation, and of the model's
behaviour, survives a round trip through the features.

On the test split's tokens, with x the activation at the features' hook and
x_hat = decode(encode(x)):

- `fvu`: fraction of variance unexplained, ||x - x_hat||^2 / ||x - mean(x)||^2;
- `kl_spliced`: x_hat is spliced into the model in place of x (every real
  token; BOS and pads keep their own values) and the forward pass continues;
  the mean over positions of KL(P_clean || P_spliced) of the next-token
  distribution;
- `ce_delta`: the mean increase of next-token cross-entropy on the sentence's
  own next tokens (`ce_clean`, the clean model's, is reported beside it).

Methods without a decoder (DiffMean, the random control) get no rows, and
one log line says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch

from bench.activations import padded_batches, tokenize
from bench.errors import ConfigError
from methods.base import Features
from tasks.base import Task, TaskData

log = logging.getLogger(__name__)


def round_trip(features: Features, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """decode(encode(x)) in chunks, float32."""
    parts = [
        features.decode(features.encode(x[i : i + chunk].float())) for i in range(0, len(x), chunk)
    ]
    return torch.cat(parts) if parts else x.float()


def splice(
    activation: torch.Tensor, hook: Any, features: Features, mask: torch.Tensor
) -> torch.Tensor:
    """TransformerLens hook: the round trip in place of the real tokens' activations."""
    out = activation.clone()
    replaced = round_trip(features, activation[mask].float().cpu())
    out[mask] = replaced.to(activation.device, activation.dtype)
    return out


@dataclass
class Reconstruction(Task):
    name: ClassVar[str] = "reconstruction"

    max_sentences: int | None = (
        None  # test sentences spliced (null = all); the split is ~250 sentences
    )
    batch_tokens: int = 4096  # padded tokens per forward batch, as activation extraction

    def __post_init__(self) -> None:
        if self.max_sentences is not None and self.max_sentences < 1:
            raise ConfigError(
                f"task.reconstruction.max_sentences={self.max_sentences}: must be >= 1 or null"
            )
        if self.batch_tokens < 1:
            raise ConfigError(f"task.reconstruction.batch_tokens={self.batch_tokens}: must be >= 1")

    def evaluate(self, model: Any, features: Features, data: TaskData, cfg: Any) -> list[dict]:
        if not features.has_decoder:
            log.info("reconstruction: %s features have no decoder; no rows", features.method)
            return []
        test = data.dataset.indices("test")
        if self.max_sentences is not None and self.max_sentences < len(test):
            # a seeded random sample: the file is grouped by concept, its head is not
            rng = np.random.default_rng(data.seed)
            test = np.sort(rng.choice(test, size=self.max_sentences, replace=False))
        acts = data.activations.subset(test)
        x = acts.acts.float()
        x_hat = round_trip(features, x)
        fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))
        kl, ce_clean, ce_spliced = self._splice(model, features, data, test, cfg)
        log.info(
            "reconstruction: FVU %.4f, KL %.4f nats, CE %.3f -> %.3f", fvu, kl, ce_clean, ce_spliced
        )
        return [
            {"metric": "fvu", "value": fvu},
            {"metric": "kl_spliced", "value": kl},
            {"metric": "ce_delta", "value": ce_spliced - ce_clean},
            {"metric": "ce_clean", "value": ce_clean},
        ]

    @torch.inference_mode()
    def _splice(self, model, features, data, sentences, cfg) -> tuple[float, float, float]:
        max_length = cfg.activations.max_length if cfg is not None else None
        token_ids, _ = tokenize(model, [data.dataset.sentences[i] for i in sentences], max_length)
        kl_sum = ce_clean_sum = ce_spliced_sum = 0.0
        n_kl = n_ce = 0
        for _, tokens, real in padded_batches(model, token_ids, self.batch_tokens):
            tokens = tokens.to(model.cfg.device)
            mask = real.to(model.cfg.device)

            hook_fn = partial(splice, features=features, mask=mask)
            clean = model(tokens).log_softmax(-1).float()
            spliced = model.run_with_hooks(tokens, fwd_hooks=[(features.hook, hook_fn)])
            spliced = spliced.log_softmax(-1).float()
            kl = (clean.exp() * (clean - spliced)).sum(-1)  # batch x width
            kl_sum += float(kl[mask].sum())
            n_kl += int(mask.sum())
            # position t predicts token t+1; both real, so BOS (never spliced) is left out
            has_next = (real[:, :-1] & real[:, 1:]).to(mask.device)
            target = tokens[:, 1:]
            ce_c = -clean[:, :-1].gather(-1, target[..., None]).squeeze(-1)
            ce_s = -spliced[:, :-1].gather(-1, target[..., None]).squeeze(-1)
            ce_clean_sum += float(ce_c[has_next].sum())
            ce_spliced_sum += float(ce_s[has_next].sum())
            n_ce += int(has_next.sum())
        return kl_sum / max(n_kl, 1), ce_clean_sum / max(n_ce, 1), ce_spliced_sum / max(n_ce, 1)
