"""Every point of the grids of the shipped measurement experiments (the SNMF ablation, the
output-centric comparison, the full comparison) composes into the config it says it runs:
the method, the hook and the tasks. Config only; no model loads."""

from __future__ import annotations

import pytest
import yaml
from hydra import compose, initialize_config_dir

from bench.core.hooks import hook_name
from tests.conftest import REPO

CONF = REPO / "conf"
VARIANTS = sorted(p.stem for p in (CONF / "snmf_variant").glob("*.yaml"))


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def _grid(name: str) -> dict[str, list[str]]:
    node = yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text())
    params = node["hydra"]["sweeper"]["params"]
    return {key: str(values).split(",") for key, values in params.items()}


@pytest.mark.parametrize(
    ("name", "hook", "tasks"),
    [
        ("snmf_ablation", "blocks.12.mlp.hook_post", ["concept_detection"]),
        ("snmf_ablation_steering", "blocks.12.hook_resid_post", ["steering"]),
    ],
)
def test_every_snmf_variant_composes_one_factor_away_from_the_default(name, hook, tasks):
    grid = _grid(name)
    assert set(grid) == {"snmf_variant"}
    assert set(grid["snmf_variant"]) <= set(VARIANTS)
    default = _compose([f"experiment={name}"])
    assert default.method._target_.endswith("snmf.SNMF") and list(default.task) == tasks
    assert hook_name(default.layer, default.hook) == hook
    base = dict(default.method)
    for variant in grid["snmf_variant"]:
        cfg = _compose([f"experiment={name}", f"snmf_variant={variant}"])
        assert list(cfg.task) == tasks and cfg.hook == default.hook, variant
        if variant == "random":
            assert cfg.method._target_.endswith("random.RandomDirections")
            continue
        changed = {k for k, v in dict(cfg.method).items() if base.get(k) != v}
        if variant == "default":
            assert not changed
            continue
        # one factor: one key, or the paper's iterations and patience together
        assert changed and (len(changed) == 1 or changed == {"max_iter", "patience"}), (
            variant,
            changed,
        )


def test_the_output_centric_experiment_reads_mlp_post_with_both_descriptions():
    for method in _grid("output_centric")["method"]:
        cfg = _compose(["experiment=output_centric", f"method={method}"])
        assert cfg.hook == "mlp_post"
        assert cfg.task.steering_feature.description == "output_centric"
        assert cfg.task.steering_feature.max_features == 32
        assert cfg.task.steering_feature_tokens.max_features == 32


def test_the_full_comparison_composes_at_both_hooks():
    grid = _grid("compare_full")
    for hook in ("mlp_post", "resid_post"):
        for method in grid["method"]:
            cfg = _compose(["experiment=compare_full", f"hook={hook}", f"method={method}"])
            assert cfg.hook == hook and cfg.task.steering.concepts is None
