"""TopK sparse autoencoder, trained with sae-lens on the cached activations.

The SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders") codes
a token x as f = TopK(((x - b_dec) @ W_enc + b_enc) * ||W_dec rows||): the k
largest pre-activations are kept (ReLU'd), the rest set to zero, and it
reconstructs x_hat = (f / ||W_dec rows||) @ W_dec + b_dec. Everything about
training is sae-lens's: `TopKTrainingSAE` (decoder-norm rescaling, the AuxK
loss that revives dead latents) driven by `SAETrainer` (Adam, gradient
clipping, LR schedule, dead-latent tracking, activation-norm scaling that is
folded back into the weights at the end, tqdm progress bar). Two pieces are
written here because sae-lens 6 has none: the data provider (`SAETrainer`
pulls batches from any iterator of tensors, but sae-lens's `ActivationsStore`
needs a language model or a dataset cached on disk, so `shuffled_batches`
reshuffles the in-memory matrix each epoch with a seeded generator), and
starting b_dec at the data mean instead of zero (Gao et al.'s recipe; on
synthetic data it cut the final FVU from 0.075 to 0.0015 at equal steps).

`SAEFeatures` (also used by `featbench.methods.sae_pretrained`) holds the SAE's weights
in `extra` and its activation function in `info["sae"]`, and replays sae-lens's
encode/decode with the same tensor operations, so a saved artifact needs no
sae-lens object to be used. Supported: "topk", "standard" (ReLU) and
"jumprelu" SAEs without run-time input normalization (see `sae_features`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from bench.core.device import resolve_device
from bench.errors import ConfigError
from featbench.methods.base import ActivationSet, Features, GeneratorInfo, Method

if TYPE_CHECKING:  # sae_lens takes seconds to import: only fit and sae_features import it
    from sae_lens import SAE

log = logging.getLogger(__name__)

ACTIVATIONS = ("topk", "relu", "jumprelu")
#: sae-lens architecture name -> the activation function SAEFeatures replays
ARCHITECTURES = {"topk": "topk", "standard": "relu", "jumprelu": "jumprelu"}
CHUNK = 8192  # tokens per encode/decode chunk: bounds memory at O(CHUNK * d_sae)


class SAEFeatures(Features):
    """An SAE as features. `directions` are the decoder rows scaled to unit norm;
    `encode` gives the SAE's own feature activations (n x d_sae, in the units of
    sae-lens's `encode`) and `decode(codes)` its reconstruction, codes @ W_dec + b_dec
    (codes scaled by 1/||W_dec rows|| first where the TopK SAE rescales by them, as
    sae-lens does). Code i moves the reconstruction by code_i * ||W_dec_i|| along
    direction i, i.e. by code_i itself for topk_sae's SAEs (unit decoder rows).

    `extra`: W_enc (d x d_sae), b_enc (d_sae), W_dec (d_sae x d), b_dec (d), and
    `threshold` (d_sae) for JumpReLU. `info["sae"]`: activation ("topk" | "relu"
    | "jumprelu"), k, apply_b_dec_to_input, rescale_acts_by_decoder_norm.
    """

    def __init__(self, directions: torch.Tensor, **kwargs: Any) -> None:
        super().__init__(directions, **kwargs)
        spec = self.info.get("sae")
        if not isinstance(spec, dict) or spec.get("activation") not in ACTIVATIONS:
            raise ValueError(f"{self.method} features: info['sae'] must name one of {ACTIVATIONS}")
        needed = ["W_enc", "b_enc", "W_dec", "b_dec"]
        needed += ["threshold"] if spec["activation"] == "jumprelu" else []
        missing = [name for name in needed if name not in self.extra]
        if missing:
            raise ValueError(f"{self.method} features: extra tensors {missing} are missing")
        if spec["activation"] == "topk" and not isinstance(spec.get("k"), int):
            raise ValueError(
                f"{self.method} features: a TopK SAE needs an integer info['sae']['k']"
            )
        self.spec = spec

    def _weight(self, name: str, device: torch.device) -> torch.Tensor:
        return self.extra[name].to(device)

    def encode(self, acts: ActivationSet | torch.Tensor) -> torch.Tensor:
        x = acts.acts if isinstance(acts, ActivationSet) else acts
        return torch.cat([self._encode(c) for c in x.split(CHUNK)] or [x.new_zeros(0, len(self))])

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        # The operations of sae-lens's TopKSAE / StandardSAE / JumpReLUSAE.encode, in order.
        w_enc, b_enc = self._weight("W_enc", x.device), self._weight("b_enc", x.device)
        b_dec = self._weight("b_dec", x.device)
        sae_in = x.to(w_enc.dtype) - b_dec * bool(self.spec.get("apply_b_dec_to_input", True))
        hidden_pre = sae_in @ w_enc + b_enc
        activation = self.spec["activation"]
        if activation == "relu":
            return hidden_pre.relu()
        if activation == "jumprelu":
            threshold = self._weight("threshold", x.device)
            return hidden_pre.relu() * (hidden_pre > threshold).to(hidden_pre.dtype)
        if self.spec.get("rescale_acts_by_decoder_norm", False):
            hidden_pre = hidden_pre * self._weight("W_dec", x.device).norm(dim=-1)
        values, indices = torch.topk(hidden_pre, k=int(self.spec["k"]), dim=-1, sorted=False)
        return torch.zeros_like(hidden_pre).scatter_(-1, indices, values.relu())

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        w_dec, b_dec = self._weight("W_dec", codes.device), self._weight("b_dec", codes.device)
        codes = codes.to(w_dec.dtype)
        if self.spec["activation"] == "topk" and self.spec.get("rescale_acts_by_decoder_norm"):
            codes = codes * (1 / w_dec.norm(dim=-1))
        return codes @ w_dec + b_dec


def sae_features(sae: SAE[Any], *, method: str, hook: str, info: dict[str, Any]) -> SAEFeatures:
    """Wrap an inference sae-lens SAE; a clear ValueError for what cannot be replayed.

    Not supported: other architectures (gated, abstopk, transcoders, temporal,
    matching pursuit, ...), run-time input normalization ("layer_norm",
    "constant_norm_rescale": decoding needs each input's norm) and unfolded
    scaling ("expected_average_only_in", "covariance_whitening": fold them into
    the weights first, as sae-lens's trainer does at the end of training).
    """
    cfg = sae.cfg
    architecture = cfg.architecture()
    if architecture not in ARCHITECTURES:
        raise ConfigError(
            f"{method}: sae-lens architecture {architecture!r} is not supported; "
            f"supported: {sorted(ARCHITECTURES)}"
        )
    if cfg.normalize_activations != "none":
        raise ConfigError(
            f"{method}: SAE has normalize_activations={cfg.normalize_activations!r}; only SAEs "
            "whose input scaling is folded into the weights ('none') are supported"
        )
    if cfg.reshape_activations != "none":
        raise ConfigError(f"{method}: reshape_activations={cfg.reshape_activations!r} unsupported")
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] * (architecture == "jumprelu"))
    extra = {name: getattr(sae, name).detach().float().cpu().clone() for name in names}
    spec = {
        "architecture": architecture,
        "activation": ARCHITECTURES[architecture],
        "k": getattr(cfg, "k", None),
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input),
        "rescale_acts_by_decoder_norm": bool(getattr(cfg, "rescale_acts_by_decoder_norm", False)),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "hook_name": cfg.metadata.hook_name,
    }
    w_dec = extra["W_dec"]
    directions = w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return SAEFeatures(
        directions, method=method, hook=hook, info={**info, "sae": spec}, extra=extra
    )


@torch.no_grad()
def reconstruction_stats(features: Features, x: torch.Tensor) -> tuple[float, float]:
    """(mse, fvu) of decode(encode(x)): mse = mean over tokens of ||x - x_hat||^2 (sae-lens's
    mse_loss) and fvu = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    mean = x.mean(0, dtype=torch.float64)
    error = total = 0.0
    for chunk in x.split(CHUNK):
        recon = features.decode(features.encode(chunk))
        error += (chunk.double() - recon.double()).pow(2).sum().item()
        total += (chunk.double() - mean).pow(2).sum().item()
    return error / max(1, x.shape[0]), (error / total if total > 0 else float("nan"))


def shuffled_batches(x: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless full batches of rows of x, reshuffled every epoch (the last partial batch
    of an epoch is dropped, so sae-lens's per-batch firing statistics stay exact)."""
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, x.shape[0])
    while True:
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        for start in range(0, x.shape[0] - size + 1, size):
            yield x[order[start : start + size]]


@dataclass
class TopKSAE(Method):
    name: ClassVar[str] = "topk_sae"

    d_sae: int = 100  # latents: the same capacity as SNMF's default rank 100; raise for wider ones
    # TopK's k: 16 of 100 latents per token. Sparse enough that a latent is selective (fires on
    # ~1 token in 6 on average), dense enough that 100 atoms still reconstruct most variance.
    k: int = 16
    epochs: float = 20.0  # passes over the train tokens: 300k samples for 15k tokens, CPU seconds
    training_tokens: int | None = None  # total samples to train on; overrides epochs when set
    batch_size: int = 256  # tokens per step: ~60 steps per epoch on 15k tokens, fast on CPU
    lr: float = 1e-3  # Adam; higher than sae-lens's 3e-4 because these runs are ~1k steps long
    lr_decay_fraction: float = 0.2  # linear decay to 0 over the last 20% of steps (Gao et al.)
    seed: int = 42  # the run's seed (Method.seeded): initial weights and batch order
    device: str = "auto"  # auto = cuda when present, else cpu
    # Another name for d_sae, as SNMF calls its feature count: one grid sweeps both methods'
    # capacity (`-m method=snmf,topk_sae method.rank=50,100`). null = use d_sae.
    rank: int | None = None

    def __post_init__(self) -> None:
        if self.rank is not None:
            if self.rank < 1:
                raise ConfigError(f"topk_sae: rank={self.rank} must be >= 1 (it sets d_sae)")
            self.d_sae = self.rank
        if not 0 < self.k <= self.d_sae:
            raise ConfigError(f"topk_sae: need 0 < k <= d_sae, got k={self.k}, d_sae={self.d_sae}")
        if self.batch_size < 1 or self.lr <= 0 or not 0 <= self.lr_decay_fraction < 1:
            raise ConfigError(
                "topk_sae: need batch_size >= 1, lr > 0 and 0 <= lr_decay_fraction < 1"
            )
        if self.training_tokens is None and self.epochs <= 0:
            raise ConfigError(f"topk_sae: epochs must be > 0, got {self.epochs}")

    def at_capacity(self, k: int, generator: GeneratorInfo | None = None) -> TopKSAE:
        """`d_sae` <- k (and the `rank` alias, where it is set). Active latents per token:

        - capacity only: the configured fraction of latents kept, ceil(self.k * k / d_sae)
          (the default 16 of 100 becomes 4 of 20), a rule in k alone, as SNMF keeps its own
          fraction of neurons;
        - given the generator: ceil(active features per token), as SNMF is given the density.

        Both are clipped to 1..k.
        """
        if generator is None:
            active = -(-self.k * k // self.d_sae)  # integer ceil
        else:
            active = math.ceil(generator.active_per_token)
        rank = None if self.rank is None else k
        return replace(self, d_sae=k, rank=rank, k=max(1, min(k, active)))

    def fit(self, acts: ActivationSet) -> Features:
        sae, info = self.train_sae(acts)
        features = sae_features(sae, method=self.name, hook=acts.hook, info=info)
        mse, fvu = reconstruction_stats(features, acts.acts)
        features.info.update(final_loss=mse, fvu=fvu)
        log.info(
            "topk_sae: %d latents (k=%d) at %s, %d steps in %.1f s, %d dead: "
            "final loss (MSE on the train tokens) %.4g, FVU %.4f",
            self.d_sae,
            self.k,
            acts.hook,
            info["steps"],
            info["train_seconds"],
            info["dead_latents"],
            mse,
            fvu,
        )
        return features

    def train_sae(self, acts: ActivationSet) -> tuple[SAE[Any], dict[str, Any]]:
        """Train sae-lens's TopKTrainingSAE on acts; returns the inference TopKSAE
        (weights in the activations' own scale) and the training info."""
        from sae_lens import SAE, LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.sae import SAEMetadata

        n, d = acts.acts.shape
        if n < 2:
            raise ConfigError(f"topk_sae: {n} tokens at {acts.hook}; need at least 2 to train")
        if not bool(acts.acts.any()):  # sae-lens's norm scaling would divide by zero
            raise ConfigError(
                f"topk_sae: every activation at {acts.hook} is zero ({n} tokens); "
                "there is nothing to train on: check the layer and hook"
            )
        device = torch.device(resolve_device(self.device))
        batch = min(self.batch_size, n)
        samples = self.training_tokens or math.ceil(self.epochs * n)
        steps = max(1, samples // batch)
        steps_per_epoch = max(1, n // batch)
        sae_cfg = TopKTrainingSAEConfig(
            d_in=d,
            d_sae=self.d_sae,
            k=self.k,
            normalize_activations="expected_average_only_in",  # scale-free lr; folded at the end
            metadata=SAEMetadata(hook_name=acts.hook),
        )
        trainer_cfg = SAETrainerConfig(
            total_training_samples=steps * batch,
            train_batch_size_samples=batch,
            lr=self.lr,
            lr_end=self.lr,  # the constant phase's lr, where the linear decay starts
            lr_decay_steps=int(self.lr_decay_fraction * steps),
            device=str(device),
            dead_feature_window=steps_per_epoch,  # dead = silent for a whole epoch: AuxK revives it
            feature_sampling_window=steps_per_epoch,
            logger=LoggingConfig(log_to_wandb=False),  # W&B is the project's side channel
            n_batches_for_norm_estimate=min(steps_per_epoch, 1000),
        )
        with torch.random.fork_rng(devices=[]):  # init on CPU: same weights on every device
            torch.manual_seed(self.seed)
            training_sae = TopKTrainingSAE(sae_cfg)
        x = acts.acts.to(device=device, dtype=torch.float32)
        trainer = SAETrainer(
            cfg=trainer_cfg, sae=training_sae, data_provider=shuffled_batches(x, batch, self.seed)
        )
        started = time.perf_counter()
        # Written here: b_dec starts at the data mean (Gao et al.'s recipe; sae-lens 6 starts it
        # at zero). The mean must be in the trainer's normalized scale, so the scaling factor is
        # estimated first, with sae-lens's own scaler; fit() keeps an estimate that is present.
        scaler = trainer.activation_scaler
        scaler.estimate_scaling_factor(
            d, trainer.data_provider, trainer_cfg.n_batches_for_norm_estimate
        )
        with torch.no_grad():
            training_sae.b_dec.copy_(
                x.mean(0, dtype=torch.float64).float().to(training_sae.b_dec.device)
                * scaler.scaling_factor
            )
        training_sae = trainer.fit()
        seconds = time.perf_counter() - started

        # What TrainingSAE.save_inference_model + SAE.load_from_disk do, in memory.
        state = {key: value.detach().clone() for key, value in training_sae.state_dict().items()}
        training_sae.process_state_dict_for_saving_inference(state)
        sae = SAE.from_dict(training_sae.cfg.get_inference_sae_cfg_dict())
        sae.load_state_dict(state)
        info = {
            "train_seconds": seconds,
            "steps": steps,
            "training_tokens": steps * batch,
            "k": self.k,
            "d_sae": self.d_sae,
            "dead_latents": int(trainer.dead_neurons.sum()),
            "seed": self.seed,
            "device": str(device),
        }
        return sae.to("cpu"), info
