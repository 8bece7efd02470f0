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


# Short name -> which width of the model the hook has (ModelConfig's d_mlp or d_model).
WIDTHS = {"mlp_post": "d_mlp", "mlp_out": "d_model", "resid_post": "d_model"}
# The points inside a block that steering and the lean decoder can call, in the order a
# block runs them (TransformerLens's names after `blocks.L.`).
POINTS = ("hook_resid_pre", "hook_attn_out", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")


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


def parse_hook_name(name: str) -> tuple[int, str]:
    """`parse_hook_name("blocks.12.mlp.hook_post") == (12, "mlp.hook_post")`: the layer and
    the point inside the block, of any TransformerLens block hook (the inverse of `hook_name`
    for the hooks it builds). Anything else is an error naming the value."""
    parts = name.split(".", 2)
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or not parts[2]:
        raise ValueError(f"hook {name!r} is not a block hook name (blocks.<layer>.<point>)")
    return int(parts[1]), parts[2]


def layer_of(name: str) -> int:
    """The layer of a block hook name: `layer_of("blocks.12.hook_mlp_out") == 12`."""
    return parse_hook_name(name)[0]


def short_of(name: str) -> str | None:
    """The short name of a full hook name (`short_of("blocks.12.mlp.hook_post") ==
    "mlp_post"`), None for a block hook featbench has no short name for."""
    try:
        layer, _ = parse_hook_name(name)
    except ValueError:
        return None
    return next(
        (short for short, template in HOOKS.items() if template.format(layer=layer) == name), None
    )


def is_mlp_post(name: str) -> bool:
    """True for an MLP-hidden hook (`blocks.L.mlp.hook_post`): its vectors reach the
    residual stream through W_out."""
    return short_of(name) == "mlp_post"
