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
capacity: 100 SNMF features for 20 true ones split and duplicate them. So the
task resizes the method through its own hook, `method.at_capacity(k_true,
generator_info)` (`featbench.methods.base.Method.at_capacity`), never by editing config
keys: each method states how it is resized. What else the method is told is
the task's `informed` setting, and every method gets the same:

- `capacity` (default): k_true only. Each method keeps its own sparsity
  settings or derives them from k_true by its stated rule (SNMF keeps its
  `sparsity`; a TopK SAE keeps its configured fraction of active latents).
- `capacity_and_sparsity`: k_true plus a `GeneratorInfo` with the generator's
  neuron density (p for `snmf`, 1.0 for the dense `sae_lens` directions) and
  its expected active features per token; SNMF then sets `sparsity` from the
  first, a TopK SAE its `k` from the second (ceil).

`method_overrides`, an explicit user override, is applied after the resize
(`dataclasses.replace`) and wins. The `adapted` column records, as JSON, every
config field the resize and the overrides changed (`dataclasses.asdict`
before and after); `informed` is a column too, and the number of directions
the method returned is `n_learned`. A method that cannot be resized
(`NotResizable`: a pretrained SAE) gets rows with value None and a `reason`.

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

Each is a mean over the k_true true features, with a 95% percentile-bootstrap
interval over them (`bench.stats`, `resamples` resamples; `n` = k_true,
`paired_over` = "true feature"). `units_hash` names the planted data, so two
methods scored on the same generator, noise and settings are paired.

A method that needs concept labels (`requires_labels`, e.g. DiffMean) cannot
be fitted on unlabeled synthetic data: its rows have value None and a `reason`;
so do the rows of a method that cannot be resized, or whose fit fails with a
featbench error.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import hydra
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from bench import stats
from bench.core.storage import sha256_json
from bench.errors import ConfigError, FeatbenchError
from bench.fit.checks import check_fitted
from featbench.methods.base import ActivationSet, Features, GeneratorInfo, Method, NotResizable
from featbench.tasks.base import Headline, Task, TaskData

log = logging.getLogger(__name__)

GENERATORS = ("snmf", "sae_lens")
HOOK = "synthetic"  # the ActivationSet's hook name: these activations are at no model hook
METRICS = ("mcc", "recovered_fraction", "mcc_abs")
PAIRED_OVER = "true feature"  # the units every metric is a mean over (and resampled over)
INFORMED = ("capacity", "capacity_and_sparsity")  # what at_capacity is told (module docstring)


@dataclass
class SyntheticRecovery(Task):
    name: ClassVar[str] = "synthetic_recovery"
    title: ClassVar[str] = "Synthetic recovery (lowest noise of each generator)"
    headlines: ClassVar[tuple[Headline, ...]] = (Headline("mcc"), Headline("recovered_fraction"))
    report_order: ClassVar[int] = 3
    # Each fit plants its own features: no units are shared between settings to pair on.
    compared: ClassVar[bool] = False

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
    resamples: int = stats.RESAMPLES  # bootstrap resamples of the true features per interval
    seed: int | None = None  # the data and the noise; None: the run's (the job's data.seed)
    # What every method's at_capacity is told: k_true only (each keeps its own sparsity), or
    # also the generator's density and active features per token. Capacity only by default:
    # no method is handed the answer it would otherwise have to find.
    informed: str = "capacity"
    method_overrides: dict[str, Any] = field(default_factory=dict)  # applied after the resize; wins

    def __post_init__(self) -> None:
        if self.informed not in INFORMED:
            raise ConfigError(
                f"task.synthetic_recovery.informed={self.informed!r}: allowed {list(INFORMED)}"
            )
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
            "resamples": self.resamples >= 1,
            "k_true": 1 <= self.k_true <= min(self.d, self.n_tokens),
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(
                    f"task.synthetic_recovery.{key}={getattr(self, key)} is out of range "
                    "(noise >= 0, 0 < sparsity <= 1, 0 < active_per_token <= k_true, "
                    "0 < threshold <= 1, resamples >= 1, 1 <= k_true <= min(d, n_tokens))"
                )

    def evaluate(self, model: Any, features: Features, data: TaskData, cfg: Any) -> list[dict]:
        """Only `cfg.method` is used: the model, the run's features and data play no part."""
        run_seed = self.seed if data is None else data.seed  # None: called outside a job
        if self.seed is None:  # a task is built per job: this is that job's seed
            self.seed = run_seed
        base = build_method(cfg.method).seeded(run_seed)
        rows: list[dict] = []
        for generator in self.generators:
            dims = {"generator": generator, "informed": self.informed, "adapted": None}
            method, reason = self._resized(base, generator)
            if method is None:
                for level in self.noise_levels:
                    rows += self._missing(reason, noise=float(level), **dims)
                    log.info("synthetic_recovery %s noise %g: %s", generator, level, reason)
                continue
            dims["adapted"] = json.dumps(config_changes(base, method), sort_keys=True, default=str)
            log.info(
                "synthetic_recovery %s: %s resized (informed: %s), changed %s",
                generator,
                type(method).__name__,
                self.informed,
                dims["adapted"],
            )
            clean, truth = self.generate(generator)
            for level in self.noise_levels:
                fresh = copy.deepcopy(method)  # a fresh instance per fit
                planted = self.activations(clean, level, generator)
                try:
                    fitted = fresh.fit(planted)
                    check_fitted(type(method).__name__, fitted, planted)
                    learned = fitted.directions
                except FeatbenchError as err:
                    reason = f"the method cannot be fitted on synthetic data: {err}"
                    log.warning("synthetic_recovery %s noise %g: %s", generator, level, reason)
                    rows += self._missing(reason, noise=float(level), **dims)
                    continue
                rows += self._scored(truth, learned, generator, float(level), dims)
        return rows

    def _resized(self, base: Method, generator: str) -> tuple[Method | None, str | None]:
        """The method at k_true, or None and why it cannot be fitted here."""
        if base.requires_labels:
            name = type(base).__name__
            return None, f"method {name} requires concept labels; synthetic activations have none"
        try:
            return self.resize(base, generator), None
        except NotResizable as err:
            return None, f"the method cannot be resized to {self.k_true} features: {err}"

    def _scored(
        self, truth: torch.Tensor, learned: torch.Tensor, generator: str, level: float, dims: dict
    ) -> list[dict]:
        """The three metrics as means over the k_true true features, with bootstrap intervals
        over them; paired across methods (same planted features <=> same units_hash)."""
        scores = matched_cosines(truth, learned)
        per_feature = [
            scores,
            (scores >= self.threshold).astype(float),
            matched_cosines(truth, learned, absolute=True),
        ]
        hash_ = self.units_hash(generator, level)
        estimates = [
            stats.mean_estimate(
                values, paired_over=PAIRED_OVER, units_hash=hash_, n_resamples=self.resamples
            )
            for values in per_feature
        ]
        log.info(
            "synthetic_recovery %s noise %g: %d learned for %d true, mcc %.3f, "
            "recovered %.2f (cos >= %g), mcc_abs %.3f",
            generator,
            level,
            learned.shape[0],
            self.k_true,
            estimates[0].value,
            estimates[1].value,
            self.threshold,
            estimates[2].value,
        )
        return self._rows(estimates, n_learned=int(learned.shape[0]), noise=level, **dims)

    def units_hash(self, generator: str, level: float) -> str:
        """Same planted features and data <=> same hash (every setting that generates them)."""
        keys = ("n_tokens", "d", "k_true", "sparsity", "active_per_token", "seed")
        return sha256_json([generator, level, {key: getattr(self, key) for key in keys}])

    def _missing(self, reason: str | None, **columns: Any) -> list[dict]:
        missing = stats.Estimate.missing(reason or "not scored", paired_over=PAIRED_OVER)
        return self._rows([missing] * len(METRICS), n_learned=None, **columns)

    def generator_info(self, generator: str) -> GeneratorInfo | None:
        """What `at_capacity` is told besides k_true: None under `informed: capacity`."""
        if self.informed == "capacity":
            return None
        density = self.sparsity if generator == "snmf" else 1.0  # sae_lens: dense directions
        return GeneratorInfo(neuron_density=density, active_per_token=self.active_per_token)

    def resize(self, method: Method, generator: str) -> Method:
        """`method.at_capacity(k_true, generator_info)`, then `method_overrides`; a new
        instance (NotResizable propagates)."""
        resized = method.at_capacity(self.k_true, self.generator_info(generator))
        if not isinstance(resized, Method):
            raise ConfigError(
                f"{type(method).__name__}.at_capacity returned {type(resized).__name__}, not a Method"
            )
        if not self.method_overrides:
            return resized
        if not dataclasses.is_dataclass(resized):
            raise ConfigError("task.synthetic_recovery.method_overrides needs a dataclass method")
        names = {f.name for f in dataclasses.fields(resized) if f.init}
        unknown = sorted(set(self.method_overrides) - names)
        if unknown:
            raise ConfigError(
                f"task.synthetic_recovery.method_overrides: {unknown} are not fields of "
                f"{type(resized).__name__} (fields: {sorted(names)})"
            )
        return dataclasses.replace(resized, **self.method_overrides)

    def _rows(self, estimates: list[stats.Estimate], **columns: Any) -> list[dict]:
        """Summary rows for METRICS in order; recovered_fraction also carries the threshold."""
        rows = [
            {"metric": metric, **estimate.row(), **columns}
            for metric, estimate in zip(METRICS, estimates, strict=True)
        ]
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


def build_method(node: Any) -> Method:
    """Instantiate the run's method from its config node (a DictConfig or a dict)."""
    method = hydra.utils.instantiate(node, _convert_="all")
    if not isinstance(method, Method):
        raise ConfigError(f"method {node.get('_target_')!r} is not a featbench.methods.base.Method")
    return method


def config_changes(before: Method, after: Method) -> dict[str, Any]:
    """The config fields whose values differ between two instances (dataclasses.asdict)."""
    old, new = _config(before), _config(after)
    return {key: value for key, value in new.items() if key not in old or old[key] != value}


def _config(method: Method) -> dict[str, Any]:
    return dataclasses.asdict(method) if dataclasses.is_dataclass(method) else dict(vars(method))


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
