"""Models from the Hugging Face hub, checked before any work: is the hub reachable, is the
model in the local cache, and a load that never waits on retries when offline.

A job calls `HubSource.check` (`check_available`) before its model loads (an offline hub
model fails at once, naming the embedded models) and hands the answer to `load_model`, so
the hub is probed once per job. Offline mode is scoped to the load (`offline_hub`), never
set for the process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

from bench.models.sources import EMBEDDED_NAME, ModelUnavailable, embedded_models

log = logging.getLogger(__name__)


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face endpoint answers a TCP connect within `timeout`."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _embedded_choices() -> str:
    """`model=a or model=b`: the embedded models, the default first."""
    names = sorted(embedded_models(), key=lambda n: (n != EMBEDDED_NAME, n)) or [EMBEDDED_NAME]
    return " or ".join(f"model={n}" for n in names)


def _offline_message(name: str, why: str) -> str:
    return (
        f"model {name!r} needs the Hugging Face hub, {why}. "
        f"Use an embedded model, {_embedded_choices()}, which work offline "
        "(or model=hf_local model.source.path=<checkpoint dir>)."
    )


def check_available(name: str) -> bool:
    """Fail now, before any work, when hub model `name` can be neither downloaded nor read
    from the local cache: a `ModelUnavailable` naming the embedded models. True when the hub
    itself answers (False: only the local cache has it)."""
    from huggingface_hub import try_to_load_from_cache
    from transformer_lens import loading_from_pretrained as loading

    try:
        official = loading.get_official_model_name(name)
    except ValueError:
        raise ModelUnavailable(
            f"model.name={name!r} is not a TransformerLens model name; use an embedded model "
            f"({_embedded_choices()}), a name from transformer_lens.supported_models, or "
            "model=hf_local model.source.path=<dir>"
        ) from None
    if hub_reachable():
        return True
    if not isinstance(try_to_load_from_cache(official, "config.json"), str):
        raise ModelUnavailable(
            _offline_message(
                name, "which is not reachable from here, and it is not in the local cache"
            )
        )
    return False


def load_hub(name: str, n_ctx: int | None, online: bool | None = None) -> Any:
    """The hub model `name` as a HookedTransformer; `online`: whether the hub answered
    (`check_available`'s result, when the caller already has it; None asks now). Offline,
    it is read from the local Hugging Face cache with the hub client in offline mode."""
    if online is None:
        online = check_available(name)
    if not online:
        log.info("hub unreachable; loading %s from the local Hugging Face cache", name)
        with offline_hub():
            return _from_pretrained(name, n_ctx)
    return _from_pretrained(name, n_ctx)


def _from_pretrained(name: str, n_ctx: int | None) -> Any:
    from transformer_lens import HookedTransformer

    kwargs = {"n_ctx": n_ctx} if n_ctx else {}
    return HookedTransformer.from_pretrained_no_processing(name, device="cpu", **kwargs)


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """huggingface_hub in offline mode for the block, then as it was: the environment
    variable (read by libraries that import it later) and the constant huggingface_hub
    read at its own import. A load from the local cache then never waits on retries, and
    the caller's process is left as it was."""
    from huggingface_hub import constants

    env, flag = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], constants.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = flag
        if env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env
