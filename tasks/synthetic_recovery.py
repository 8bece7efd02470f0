"""Synthetic recovery: does the method find planted features when the truth is known?

No language model is involved. The task generates token x d activations from
`k_true` known unit directions, fits a fresh instance of the run's method on
them (`hydra.utils.instantiate(cfg.method)`; the task never knows which
method it is) and scores the learned directions against the true ones.

Two generator families, so that neither family of methods is favoured:

- `snmf`: SNMF's generative story. Each true feature is a column of Z*
  (d x k_true) with ceil(p d) non-zero neurons (random signs, magnitudes in
  [0.5, 1.5)); each token uses a few features through non-negative
  coefficients Y* >= 0 (feature j is on with probability
  `active_per_token / k_true`, coefficient uniform in [0, 1)); X = (Z* Y*)^T.
  The true directions are Z*'s columns, normalized.
- `sae_lens`: sae-lens's synthetic data (`sae_lens.synthetic`): a
  `FeatureDictionary` of k_true dense random unit feature vectors (no bias,
  no orthogonalization: `SyntheticModel`'s defaults) and an
  `ActivationGenerator` with the same firing probability per feature as
  above and per-feature mean magnitudes from 0.5 to 1.5 (sae-lens's
  `LinearMagnitudeConfig`), std 0.25.
  The true directions are the dictionary's feature vectors.

Both have the same expected number of active features per token, so the
families differ only in their structural assumption: sparse signed neuron
groups (SNMF) versus dense near-orthogonal directions (SAE). Noise is
Gaussian with std = noise level x the std of the clean matrix.

Capacity. Recovery is only measurable when the method is given the true
capacity: 100 SNMF features for 20 true ones split and duplicate them, and
an SNMF that keeps 1% of neurons cannot express a feature spread over 5% (or,
for the dense `sae_lens` generator, all) of them. So by default
(`match_capacity`) the method's config is adapted before instantiation:

- `rank`, `d_sae` or `n_features` (whichever keys it has) <- k_true;
  hierarchical SNMF's `ranks` <- [k_true, k_true // 2];
- `sparsity` (SNMF's fraction of neurons kept per feature) <- the generator's
  true density: p for `snmf`, 1.0 for `sae_lens` (dense directions);
- `k` next to `d_sae` (a TopK SAE's active latents per token) <-
  ceil(active_per_token), at most k_true.

`method_overrides` is merged last and wins. The keys set this way (adaptation
and overrides) are recorded as JSON in the `adapted` column, and the number of
directions the method returned in `n_learned`.

Metrics (rows per `generator` x `noise`; `feature` and `concept` unset):

- `mcc`: mean over all k_true true features of the signed cosine with its
  learned direction under a Hungarian matching (scipy's linear_sum_assignment).
  Signed, because SNMF and SAE directions have meaningful signs (SNMF's
  coefficients and SAE latents are >= 0, so -v is a different feature from v);
  a negative cosine counts as 0 (an anti-aligned direction recovers nothing),
  so the value lies in [0, 1]. When the method returns fewer directions than
  true features, the unmatched true features count as 0: missing a feature is
  failing to recover it. Sign-arbitrary methods (PCA) are scored the same way.
- `recovered_fraction`: share of true features whose matched cosine >=
  `threshold` (also a column).
- `mcc_abs`: the same with |cosine|, sae-lens's MCC (`mean_correlation_coefficient`,
  equal to it when the method returns >= k_true directions); a sign-blind reference.

A method that needs concept labels (`requires_labels`, e.g. DiffMean) cannot
be fitted on unlabeled synthetic data: its rows have value None and a `reason`;
so do the rows of a method whose fit fails with a featbench error (a
pretrained SAE of another width).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from scipy.optimize import linear_sum_assignment

from bench.errors import ConfigError, FeatbenchError
from methods.base import ActivationSet, Features, Method
from tasks.base import Task, TaskData

log = logging.getLogger(__name__)

GENERATORS = ("snmf", "sae_lens")
HOOK = "synthetic"  # the ActivationSet's hook name: these activations are at no model hook
METRICS = ("mcc", "recovered_fraction", "mcc_abs")


@dataclass
class SyntheticRecovery(Task):
    name: ClassVar[str] = "synthetic_recovery"

    # Both families: SNMF's own story and sae-lens's, so neither kind of method is favoured.
    generators: list[str] = field(default_factory=lambda: list(GENERATORS))
    # Clean data and a mild noise level, to see which methods degrade gracefully.
    noise_levels: list[float] = field(default_factory=lambda: [0.0, 0.1])
    n_tokens: int = 4000  # 200 tokens per true feature: enough to identify them, seconds on CPU
    d: int = 256  # width of the space: big enough for 20 sparse features, fast on CPU
    k_true: int = 20  # planted features: few, so that capacity matching stays cheap
    sparsity: float = 0.05  # p: ceil(p d) = 13 neurons per `snmf` feature (SNMF's meaning)
    active_per_token: float = 3.0  # expected features on per token: sparse codes, as in LMs
    threshold: float = 0.9  # a true feature counts as recovered at matched cosine >= 0.9
    seed: int = 42  # the run's seed (YAML: ${seed}): the data, the noise
    match_capacity: bool = True  # adapt rank/d_sae/n_features, sparsity, k (module docstring)
    method_overrides: dict[str, Any] = field(default_factory=dict)  # merged last; wins

    def __post_init__(self) -> None:
        unknown = sorted(set(self.generators) - set(GENERATORS))
        if unknown or not self.generators:
            raise ConfigError(
                f"task.synthetic_recovery.generators={self.generators}: allowed {list(GENERATORS)}"
            )
        checks = {
            "noise_levels": all(level >= 0 for level in self.noise_levels),
            "sparsity": 0 < self.sparsity <= 1,
            "active_per_token": 0 < self.active_per_token <= self.k_true,
            "threshold": 0 < self.threshold <= 1,
            "k_true": 1 <= self.k_true <= min(self.d, self.n_tokens),
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(
                    f"task.synthetic_recovery.{key}={getattr(self, key)} is out of range "
                    "(noise >= 0, 0 < sparsity <= 1, 0 < active_per_token <= k_true, "
                    "0 < threshold <= 1, 1 <= k_true <= min(d, n_tokens))"
                )

    def evaluate(self, model: Any, features: Features, data: TaskData, cfg: Any) -> list[dict]:
        """Only `cfg.method` is used: the model, the run's features and data play no part."""
        rows: list[dict] = []
        for generator in self.generators:
            method_cfg, changes = self.method_config(cfg.method, generator)
            adapted = json.dumps(changes, sort_keys=True)
            if build_method(method_cfg).requires_labels:
                reason = (
                    f"method {method_cfg['_target_']} requires concept labels; "
                    "synthetic activations have none"
                )
                for level in self.noise_levels:
                    dims = {"generator": generator, "noise": float(level), "adapted": adapted}
                    rows += self._rows([None] * 3, n_learned=None, reason=reason, **dims)
                    log.info("synthetic_recovery %s noise %g: %s", generator, level, reason)
                continue
            clean, truth = self.generate(generator)
            for level in self.noise_levels:
                method = build_method(method_cfg)  # a fresh instance per fit
                dims = {"generator": generator, "noise": float(level), "adapted": adapted}
                try:
                    learned = method.fit(self.activations(clean, level, generator)).directions
                except FeatbenchError as err:  # e.g. a pretrained SAE of another width
                    reason = f"the method cannot be fitted on synthetic data: {err}"
                    log.warning("synthetic_recovery %s noise %g: %s", generator, level, reason)
                    rows += self._rows([None] * 3, n_learned=None, reason=reason, **dims)
                    continue
                scores = matched_cosines(truth, learned)
                values = [
                    float(scores.mean()),
                    float((scores >= self.threshold).mean()),
                    float(matched_cosines(truth, learned, absolute=True).mean()),
                ]
                rows += self._rows(values, n_learned=int(learned.shape[0]), **dims)
                log.info(
                    "synthetic_recovery %s noise %g: %d learned for %d true, mcc %.3f, "
                    "recovered %.2f (cos >= %g), mcc_abs %.3f",
                    generator, level, learned.shape[0], self.k_true, values[0], values[1],
                    self.threshold, values[2],
                )  # fmt: skip
        return rows

    def _rows(self, values: list[float | None], **columns: Any) -> list[dict]:
        """Summary rows for METRICS in order; recovered_fraction also carries the threshold."""
        rows = [{"metric": m, "value": v, **columns} for m, v in zip(METRICS, values, strict=True)]
        rows[1]["threshold"] = self.threshold
        return rows

    # -- data ---------------------------------------------------------------------------------

    def generate(self, generator: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean activations (n_tokens x d) and the true unit directions (k_true x d)."""
        if generator == "snmf":
            return self._snmf_data()
        return self._sae_lens_data()

    def _seed(self, *keys: int) -> int:
        """A seed for one purpose, mixed from the run's seed: never the run's seed itself,
        which the methods use too (RandomDirections' randn(k, d) from seed s would otherwise
        *be* the sae-lens dictionary, also randn(k, d) from seed s)."""
        return int(np.random.SeedSequence([self.seed, *keys]).generate_state(1)[0])

    def _snmf_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self._seed(0))
        firing = self.active_per_token / self.k_true
        x, z = planted_snmf(self.n_tokens, self.d, self.k_true, self.sparsity, firing, gen)
        return x, (z / z.norm(dim=0)).T

    def _sae_lens_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sae_lens.synthetic import (
            ActivationGenerator,
            ConstantFiringProbabilityConfig,
            FeatureDictionary,
            LinearMagnitudeConfig,
            generate_magnitudes,
        )

        k = self.k_true
        # Random unit vectors, no bias: SyntheticModel's defaults (no orthogonalization; at
        # k_true << d they are nearly orthogonal anyway: typical |cos| ~ 1/sqrt(d)).
        dictionary = FeatureDictionary(k, self.d, bias=False, initializer=None, seed=self._seed(1))
        probability = ConstantFiringProbabilityConfig(self.active_per_token / k).generate(k)
        sampler = ActivationGenerator(
            k,
            firing_probabilities=probability,
            std_firing_magnitudes=0.25,  # magnitudes vary per token, as feature strength does
            mean_firing_magnitudes=generate_magnitudes(k, LinearMagnitudeConfig(0.5, 1.5)),
        )
        with torch.random.fork_rng(devices=[]):  # sample() draws from the global generator
            torch.manual_seed(self._seed(1, 1))
            with torch.no_grad():
                x = dictionary(sampler.sample(self.n_tokens))
        truth = dictionary.feature_vectors.detach()
        return x.detach(), truth / truth.norm(dim=1, keepdim=True)

    def activations(self, clean: torch.Tensor, level: float, generator: str) -> ActivationSet:
        """The clean matrix plus Gaussian noise (std = level x std of clean), as an ActivationSet."""
        x = clean
        if level > 0:
            keys = (GENERATORS.index(generator), 2, round(level * 1e6))
            gen = torch.Generator().manual_seed(self._seed(*keys))
            x = clean + level * clean.std() * torch.randn(clean.shape, generator=gen)
        n = x.shape[0]
        index = torch.arange(n)
        return ActivationSet(x.contiguous(), index, index, index, HOOK, meta={"synthetic": True})

    # -- method --------------------------------------------------------------------------------

    def method_config(self, node: Any, generator: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The method's resolved config with the capacity adaptation and `method_overrides`
        (merged last) applied, and the keys that were set that way."""
        resolved = (
            OmegaConf.to_container(node, resolve=True)
            if isinstance(node, DictConfig)
            else dict(node)
        )
        changes: dict[str, Any] = {}
        if self.match_capacity:
            for key in ("rank", "d_sae", "n_features"):
                if resolved.get(key) is not None:  # topk_sae's rank: null is an unset alias
                    changes[key] = self.k_true
            if "ranks" in resolved:  # hierarchical SNMF: the true capacity, then a coarser level
                changes["ranks"] = [self.k_true, max(1, self.k_true // 2)]
            if "sparsity" in resolved:
                changes["sparsity"] = self.sparsity if generator == "snmf" else 1.0
            if "k" in resolved and "d_sae" in resolved:
                changes["k"] = min(self.k_true, math.ceil(self.active_per_token))
        changes.update(self.method_overrides)
        return {**resolved, **changes}, changes


def planted_snmf(
    n: int, d: int, k: int, p: float, firing: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """SNMF's generative story: X (n x d) = (Z* Y*)^T with Z* (d x k) of ceil(p d)
    signed non-zeros per column (magnitudes in [0.5, 1.5)) and Y* >= 0, each
    entry on with probability `firing` (value uniform in [0, 1))."""
    m = math.ceil(p * d)
    z = torch.zeros(d, k)
    for j in range(k):
        idx = torch.randperm(d, generator=gen)[:m]
        signs = torch.randint(0, 2, (m,), generator=gen).float() * 2 - 1
        z[idx, j] = signs * (0.5 + torch.rand(m, generator=gen))
    on = torch.rand(k, n, generator=gen) < firing
    y = torch.rand(k, n, generator=gen) * on
    return (z @ y).T, z


def build_method(method_cfg: dict[str, Any]) -> Method:
    method = hydra.utils.instantiate(method_cfg, _convert_="all")
    if not isinstance(method, Method):
        raise ConfigError(f"method {method_cfg.get('_target_')!r} is not a methods.base.Method")
    return method


def matched_cosines(
    truth: torch.Tensor, learned: torch.Tensor, absolute: bool = False
) -> np.ndarray:
    """Per true feature (rows of `truth`, k x d), its cosine with the learned direction
    (rows of `learned`) a Hungarian matching assigns to it; 0 for unmatched features.

    Signed cosines are floored at 0 before matching (an anti-aligned direction is no
    match); `absolute` matches on |cosine| instead.
    """
    unit = torch.nn.functional.normalize
    cos = (unit(truth.double(), dim=1) @ unit(learned.double(), dim=1).T).numpy()
    cos = np.abs(cos) if absolute else cos.clip(min=0)
    scores = np.zeros(truth.shape[0])
    if cos.size:
        rows, cols = linear_sum_assignment(cos, maximize=True)
        scores[rows] = cos[rows, cols]
    return scores
