"""Reconstruction faithfulness: how much of the activation, and of the model's
behaviour, survives a round trip through the features.

On the test split's tokens, with x the activation at the features' hook and
x_hat = decode(encode(x)):

- `fvu`: fraction of variance unexplained, pooled: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
  over the split's tokens. A few tokens of massive norm can carry most of the denominator
  (SmolLM2's first real token at resid_post holds ~93% of the variance there), and then
  `fvu` says how well those few are reconstructed, not the rest;
- `explained_variance_per_token`: the mean over tokens of 1 - ||x - x_hat||^2 /
  ||x - mean(x)||^2 (SAEBench's core evaluation), where every token counts once; read it
  beside `fvu` to see when a few tokens dominate;
- `kl_spliced`: x_hat is spliced into the model in place of x (every real
  token; BOS and pads keep their own values) and the forward pass continues;
  the mean over positions of KL(P_clean || P_spliced) of the next-token
  distribution;
- `ce_delta`: the mean increase of next-token cross-entropy on the sentence's
  own next tokens (`ce_clean`, the clean model's, is reported beside it).

Each metric is a ratio of sums over the test sentences; its 95% interval is
bootstrapped over test sentences (`bench.stats`), paired across methods
scored on the same split.

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

from bench import stats
from bench.activations.extraction import padded_batches, tokenize
from bench.errors import ConfigError
from featbench.methods.base import Features
from featbench.tasks.base import Headline, Task, TaskData

log = logging.getLogger(__name__)


def splice(
    activation: torch.Tensor, hook: Any, replacement: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """TransformerLens hook: `replacement` (one row per True of `mask`, row-major) in place
    of the real tokens' activations."""
    out = activation.clone()
    out[mask] = replacement.to(activation.device, activation.dtype)
    return out


@dataclass
class Reconstruction(Task):
    name: ClassVar[str] = "reconstruction"
    title: ClassVar[str] = "Reconstruction"
    headlines: ClassVar[tuple[Headline, ...]] = (
        Headline("fvu", higher_is_better=False),
        Headline("explained_variance_per_token"),
        Headline("kl_spliced", higher_is_better=False),
        Headline("ce_delta", higher_is_better=False),
    )
    report_order: ClassVar[int] = 2  # after steering and concept detection
    needs_test_split: ClassVar[bool] = True  # FVU and the spliced KL are on test sentences

    max_sentences: int | None = (
        None  # test sentences spliced (null = all); the split is ~250 sentences
    )
    batch_tokens: int = 4096  # padded tokens per forward batch, as activation extraction
    bootstrap: int = stats.RESAMPLES  # resamples of the test sentences for the 95% intervals

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
        encodings = data.encodings(features)  # the job's codes: decoded here, not encoded again
        x, x_hat = acts.acts.float(), encodings.decoded(encodings.rows(test))
        err, dev, explained = token_errors(x, x_hat)
        local = torch.as_tensor(np.searchsorted(test, acts.sentence_ids.numpy()))
        sums = {
            "err": _per_sentence(err, local, len(test)),
            "dev": _per_sentence(dev, local, len(test)),
            "explained": _per_sentence(explained, local, len(test)),
            "tokens": _per_sentence(torch.ones_like(err), local, len(test)),
        }
        sums.update(self._splice(model, features.hook, x_hat, acts, data, test, cfg))
        ratios = {  # metric: (numerator, denominator), each summed over sentences
            "fvu": (sums["err"], sums["dev"]),
            "explained_variance_per_token": (sums["explained"], sums["tokens"]),
            "kl_spliced": (sums["kl"], sums["n_kl"]),
            "ce_delta": (sums["ce_spliced"] - sums["ce_clean"], sums["n_ce"]),
            "ce_clean": (sums["ce_clean"], sums["n_ce"]),
        }
        units = stats.units_hash(data.dataset.content_hash, test.tolist())
        rows = []
        for metric, (top, bottom) in ratios.items():
            estimate = stats.statistic_estimate(
                len(test),
                partial(_ratio, top, bottom),
                paired_over="test sentence",
                units_hash=units,
                n_resamples=self.bootstrap,
                seed=data.seed,
            )
            rows.append({"metric": metric, **estimate.row()})
        values = {r["metric"]: r["value"] for r in rows}
        log.info(
            "reconstruction: FVU %.4f (per-token explained variance %.4f), KL %.4f nats, "
            "CE delta %.3f (clean %.3f)",
            values["fvu"],
            values["explained_variance_per_token"],
            values["kl_spliced"],
            values["ce_delta"],
            values["ce_clean"],
        )
        return rows

    @torch.inference_mode()
    def _splice(self, model, hook, x_hat, acts, data, sentences, cfg) -> dict[str, np.ndarray]:
        """Per test sentence: summed KL(P_clean || P_spliced) over its real tokens, clean and
        spliced next-token cross-entropy over positions whose next token is real, and the
        counts of each. `x_hat` (rows of `acts`, the test sentences' cached activations) is
        what replaces each sentence's real tokens at `hook`."""
        max_length = cfg.activations.max_length if cfg is not None else None
        token_ids, _ = tokenize(model, [data.dataset.sentences[i] for i in sentences], max_length)
        ids = acts.sentence_ids
        start = torch.searchsorted(ids, torch.as_tensor(sentences), side="left").tolist()
        stop = torch.searchsorted(ids, torch.as_tensor(sentences), side="right").tolist()
        out = {
            k: np.zeros(len(sentences)) for k in ("kl", "n_kl", "ce_clean", "ce_spliced", "n_ce")
        }
        per_batch = logit_batch_tokens(self.batch_tokens, model.cfg.d_vocab)
        for batch, tokens, real in padded_batches(model, token_ids, per_batch):
            tokens = tokens.to(model.cfg.device)
            mask = real.to(model.cfg.device)
            rows = [x_hat[start[i] : stop[i]] for i in batch]  # row-major, as mask's True
            counts = real.sum(1).tolist()
            if [len(r) for r in rows] != counts:
                raise RuntimeError(
                    f"reconstruction: the cached activations hold {[len(r) for r in rows]} rows "
                    f"for sentences {[int(sentences[i]) for i in batch]}, the tokenizer gives "
                    f"{counts} real tokens (activations.max_length differs from extraction?)"
                )
            hook_fn = partial(splice, replacement=torch.cat(rows), mask=mask)
            clean = model(tokens).log_softmax(-1).float()
            spliced = model.run_with_hooks(tokens, fwd_hooks=[(hook, hook_fn)])
            spliced = spliced.log_softmax(-1).float()
            kl = (clean.exp() * (clean - spliced)).sum(-1) * mask  # batch x width
            # position t predicts token t+1; both real, so BOS (never spliced) is left out
            has_next = (real[:, :-1] & real[:, 1:]).to(mask.device)
            target = tokens[:, 1:]
            ce_c = -clean[:, :-1].gather(-1, target[..., None]).squeeze(-1) * has_next
            ce_s = -spliced[:, :-1].gather(-1, target[..., None]).squeeze(-1) * has_next
            for key, value in (
                ("kl", kl),
                ("n_kl", mask),
                ("ce_clean", ce_c),
                ("ce_spliced", ce_s),
                ("n_ce", has_next),
            ):
                out[key][batch] = value.double().sum(1).cpu().numpy()
        return out


def token_errors(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per token: the squared error ||x - x_hat||^2, the squared deviation from the tokens'
    mean ||x - mean(x)||^2 (FVU's denominator), and the explained variance 1 - error /
    deviation. Summed, the first two give the pooled `fvu`; the third, averaged, gives
    `explained_variance_per_token`."""
    err = (x - x_hat).pow(2).sum(1)
    dev = (x - x.mean(0)).pow(2).sum(1)
    return err, dev, 1.0 - err / dev.clamp_min(torch.finfo(dev.dtype).tiny)


LOGIT_BUDGET = 2 << 30  # bytes of full-vocabulary tensors per batch: well inside 24 GiB
LOGIT_COPIES = 6  # live [tokens x vocab] float32 tensors: two logits, two log-softmaxes, exp, diff


def logit_batch_tokens(batch_tokens: int, d_vocab: int) -> int:
    """Padded tokens per forward batch: `batch_tokens`, capped so that the batch's
    full-vocabulary tensors stay within LOGIT_BUDGET. Gemma 3's 262,144-token vocabulary
    makes 4,096 tokens of them 26 GB (the process was killed for it); SmolLM2's 49,152, 5 GB."""
    return max(1, min(batch_tokens, LOGIT_BUDGET // (d_vocab * 4 * LOGIT_COPIES)))


def _per_sentence(values: torch.Tensor, sentence: torch.Tensor, n: int) -> np.ndarray:
    """Sum of per-token values per sentence (sentence[i] = row i's index among n)."""
    return torch.zeros(n, dtype=torch.float64).index_add_(0, sentence, values.double()).numpy()


def _ratio(top: np.ndarray, bottom: np.ndarray, idx: np.ndarray) -> float:
    """sum(top[idx]) / sum(bottom[idx]): a ratio of sums over (resampled) sentences."""
    denominator = bottom[idx].sum()
    return float(top[idx].sum() / denominator) if denominator > 0 else float("nan")
