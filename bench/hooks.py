"""Canonical TransformerLens hook names: the one place they are built.

Every module that names a hook (activation extraction, steering, splicing a
reconstruction back into the model) calls `hook_name`, so a run's `hook`
column and the hook the method was fitted on always agree.
"""

from __future__ import annotations

from bench.errors import ConfigError

# Short name (the `hook` config value) -> TransformerLens hook template.
HOOKS = {
    "mlp_post": "blocks.{layer}.mlp.hook_post",  # MLP activations (d_mlp): the SNMF paper's space
    "mlp_out": "blocks.{layer}.hook_mlp_out",  # MLP output written to the residual (d_model)
    "resid_post": "blocks.{layer}.hook_resid_post",  # residual stream after the block (d_model)
}


def hook_name(layer: int, hook: str, n_layers: int | None = None) -> str:
    """`hook_name(12, "mlp_post") == "blocks.12.mlp.hook_post"`.

    With `n_layers`, a layer outside the model is an error naming the valid range.
    """
    if hook not in HOOKS:
        raise ConfigError(f"hook={hook!r} is not a known hook; allowed: {sorted(HOOKS)}")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ConfigError(f"layer={layer!r} must be an integer")
    if n_layers is not None and not 0 <= layer < n_layers:
        raise ConfigError(f"layer={layer} is outside the model: valid layers are 0..{n_layers - 1}")
    return HOOKS[hook].format(layer=layer)
