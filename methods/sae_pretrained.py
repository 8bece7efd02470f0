"""A pretrained sparse autoencoder, loaded through sae-lens (no training).

Two sources, exactly one of them:

- `release` + `sae_id`: a release from sae-lens's pretrained directory (or a
  Hugging Face repo id), through `SAE.from_pretrained`. It needs the hub, or
  the SAE already in the local Hugging Face cache with `HF_HUB_OFFLINE=1` set
  before the run starts; otherwise the method fails at once (before the model
  is loaded) with a message that points to `path`.
- `path`: a folder in sae-lens's own format (`cfg.json` +
  `sae_weights.safetensors`, as `SAE.save_model` writes it), through
  `SAE.load_from_disk`. Works offline.

`fit(acts)` checks that the SAE was trained at the run's hook (its
`cfg.metadata.hook_name`) and on vectors of the run's width (`cfg.d_in`), and
wraps it in `featbench.methods.topk_sae.SAEFeatures`, which replays the SAE's own encode
(TopK, ReLU or JumpReLU) from the weights it keeps; other architectures and
SAEs with run-time input normalization are refused with a clear error (see
`featbench.methods.topk_sae.sae_features`). As a guard, the replayed encodings of the
first tokens are compared with sae-lens's `SAE.encode`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open

from bench.errors import ConfigError
from bench.models.hub import hub_reachable
from bench.models.sources import EMBEDDED_NAME
from featbench.methods.base import ActivationSet, Features, GeneratorInfo, Method, NotResizable
from featbench.methods.topk_sae import reconstruction_stats, sae_features

if TYPE_CHECKING:
    from sae_lens import SAE

log = logging.getLogger(__name__)

SAE_FILES = ("cfg.json", "sae_weights.safetensors")  # sae-lens's on-disk format
GUARD_TOKENS = 256  # tokens whose encodings are checked against sae-lens's own encode


class SAEUnavailable(ConfigError):
    """The configured SAE cannot be loaded (offline, missing files, unknown id)."""


def check_sae_folder(folder: Path) -> None:
    """Cheap integrity checks of a saved SAE, before any model loads: cfg.json is a JSON
    object and the weights file has a readable safetensors header. A file that fails
    is named in the error."""
    cfg_path, weights_path = folder / SAE_FILES[0], folder / SAE_FILES[1]
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SAEUnavailable(f"sae_pretrained: {cfg_path} is not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise SAEUnavailable(f"sae_pretrained: {cfg_path} must hold a JSON object")
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            names = list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise SAEUnavailable(
            f"sae_pretrained: {weights_path} is not a readable safetensors file ({err})"
        ) from None
    if not names:
        raise SAEUnavailable(f"sae_pretrained: {weights_path} holds no tensors")


def _env_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in {"1", "on", "yes", "true"}


@dataclass
class SAEPretrained(Method):
    name: ClassVar[str] = "sae_pretrained"

    release: str | None = None  # sae-lens release name (or HF repo id); needs the hub
    sae_id: str | None = None  # the SAE inside the release, e.g. "blocks.8.hook_resid_pre"
    path: str | None = None  # folder with cfg.json + sae_weights.safetensors; works offline

    def __post_init__(self) -> None:
        # Cheap checks here, so a bad config fails before the model and activations load.
        by_release = self.release is not None or self.sae_id is not None
        if by_release == (self.path is not None):
            raise ConfigError(
                "sae_pretrained: set either method.release and method.sae_id (hub) "
                "or method.path (a folder saved by sae-lens), not both and not neither"
            )
        if by_release and not (self.release and self.sae_id):
            raise ConfigError("sae_pretrained: method.release and method.sae_id go together")
        if self.path is not None:
            folder = Path(self.path).expanduser()
            missing = [name for name in SAE_FILES if not (folder / name).is_file()]
            if missing:
                raise SAEUnavailable(
                    f"sae_pretrained: {folder} lacks {missing}; method.path must be a folder "
                    "written by sae-lens (SAE.save_model: cfg.json + sae_weights.safetensors)"
                )
            check_sae_folder(folder)
        elif not self._hub_usable():
            raise SAEUnavailable(self._offline_message())

    def _hub_usable(self) -> bool:
        """The hub answers, or huggingface_hub itself is in offline mode (cache only:
        a cached SAE loads, a missing one fails fast with a LocalEntryNotFoundError)."""
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
        # HF_HUB_OFFLINE set after huggingface_hub was imported does not reach the library,
        # which would then retry the network for half a minute: treat it as unreachable.
        return not _env_offline() and hub_reachable()

    def _offline_message(self, detail: str = "which is not reachable from here") -> str:
        return (
            f"sae_pretrained: release={self.release!r} sae_id={self.sae_id!r} needs the "
            f"Hugging Face hub, {detail}. Offline, run the embedded model "
            f"(model={EMBEDDED_NAME}) with an SAE saved on disk in sae-lens's format: "
            "method=sae_pretrained method.path=<folder with cfg.json and "
            "sae_weights.safetensors> (what sae-lens's SAE.save_model writes)."
        )

    def load(self) -> SAE[Any]:
        """The sae-lens SAE, float32 on the CPU (SAEFeatures moves weights to the data)."""
        from sae_lens import SAE

        if self.path is not None:
            folder = Path(self.path).expanduser()
            try:
                return SAE.load_from_disk(folder, device="cpu", dtype="float32")
            except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
                raise SAEUnavailable(
                    f"sae_pretrained: the SAE in {folder} cannot be loaded ({err}); "
                    "method.path must be a folder written by sae-lens's SAE.save_model"
                ) from None
        try:
            return SAE.from_pretrained(self.release, self.sae_id, device="cpu", dtype="float32")
        except OSError as err:  # LocalEntryNotFoundError, HfHubHTTPError, missing files
            from huggingface_hub import constants

            if constants.HF_HUB_OFFLINE:
                detail = "and HF_HUB_OFFLINE is set but the SAE is not in the local cache"
                raise SAEUnavailable(self._offline_message(detail)) from err
            raise SAEUnavailable(
                f"sae_pretrained: could not load release={self.release!r} "
                f"sae_id={self.sae_id!r} from the hub: {err}"
            ) from err

    def at_capacity(self, k: int, generator: GeneratorInfo | None = None) -> SAEPretrained:
        """Not resizable: the SAE's width and sparsity are fixed by its trained weights."""
        raise NotResizable(
            "sae_pretrained loads trained weights; their width and sparsity cannot be set "
            f"to a capacity of {k}"
        )

    def fit(self, acts: ActivationSet) -> Features:
        sae = self.load()
        source = self.path if self.path is not None else f"{self.release}/{self.sae_id}"
        sae_hook, sae_width = sae.cfg.metadata.hook_name, sae.cfg.d_in
        problems = []
        if sae_hook is not None and sae_hook != acts.hook:
            problems.append(f"the SAE's hook is {sae_hook!r}, the run's is {acts.hook!r}")
        if sae_width != acts.d:
            problems.append(f"the SAE's input width d_in is {sae_width}, the run's is {acts.d}")
        if sae.cfg.metadata.hook_head_index is not None:
            problems.append(f"the SAE reads one head ({sae.cfg.metadata.hook_head_index})")
        if problems:
            raise ConfigError(
                f"sae_pretrained: SAE {source} does not fit the run's activations: "
                + "; ".join(problems)
            )
        if sae_hook is None:
            log.warning("sae_pretrained: %s names no hook; assuming %s", source, acts.hook)
        info = {"source": source, "k": getattr(sae.cfg, "k", None), "d_sae": sae.cfg.d_sae}
        features = sae_features(sae, method=self.name, hook=acts.hook, info=info)
        self._check_replay(sae, features, acts.acts[:GUARD_TOKENS])
        mse, fvu = reconstruction_stats(features, acts.acts)
        features.info.update(mse=mse, fvu=fvu)  # of this run's train tokens
        log.info(
            "sae_pretrained: %s (%s, %d latents) at %s: MSE %.4g, FVU %.4f on %d tokens",
            source,
            features.info["sae"]["architecture"],
            sae.cfg.d_sae,
            acts.hook,
            mse,
            fvu,
            len(acts),
        )
        return features

    @torch.no_grad()
    def _check_replay(self, sae: SAE[Any], features: Features, x: torch.Tensor) -> None:
        expected = sae.encode(x.to(sae.device, torch.float32)).to_dense().cpu()
        got = features.encode(x.float()).cpu()
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            worst = (got - expected).abs().max().item()
            raise ConfigError(
                f"sae_pretrained: replaying {type(sae).__name__}.encode differs from sae-lens "
                f"by up to {worst:.3g}; this SAE's configuration is not supported"
            )
