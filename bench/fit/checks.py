"""What a fit must give back, checked right after it: directions of the shape every task
reads, so a plugin's mistake is named where it was made, not later as a torch error."""

from __future__ import annotations

from bench.activations.set import ActivationSet
from bench.errors import ConfigError
from bench.fit.features import Features


def check_fitted(name: str, features: Features, acts: ActivationSet) -> None:
    """Raise ConfigError unless `features` holds k x d directions (k >= 1, d the width of the
    hook fitted on) at that hook, naming the method, the shape expected and the shape got."""
    if not isinstance(features, Features):
        raise ConfigError(
            f"method {name}: fit returned {type(features).__name__}, not Features "
            "(bench.fit.features; plugins import it from featbench.methods.base)"
        )
    shape = tuple(features.directions.shape)
    if shape[0] < 1 or shape[1] != acts.d:
        raise ConfigError(
            f"method {name}: fit returned directions of shape {shape}; expected k x {acts.d} "
            f"(k >= 1 features by the width of {acts.hook}, {acts.d})"
        )
    if features.hook != acts.hook:
        raise ConfigError(
            f"method {name}: fit returned features at hook {features.hook!r}, but it was "
            f"fitted on {acts.hook!r}; pass hook=acts.hook to Features"
        )
