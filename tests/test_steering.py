"""The steering task on the real embedded model and the real offline judge."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

import bench.config  # noqa: F401  (registers the schema the config composes on)
from bench.run import run_job
from tests.conftest import REPO

pytestmark = pytest.mark.integration

# Smaller than the defaults (CI time) but the same protocol: 4 features, 3 KL
# targets, both signs, 4 samples of 32 tokens each.
SMALL = [
    "task=[steering]",
    "task.steering.max_features=4",
    "task.steering.kl_targets=[0.1,0.25,0.5]",
    "task.steering.samples=4",
    "task.steering.max_new_tokens=32",
    "task.steering.baseline_samples=8",
    "device=cpu",
]


def _job(tmp_path, name, overrides) -> pd.DataFrame:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return run_job(cfg, tmp_path / name)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, embedded):
    tmp = tmp_path_factory.mktemp("steering")
    return {
        "diffmean": _job(tmp, "diffmean", ["method=diffmean", *SMALL]),
        "random": _job(tmp, "random", ["method=random", *SMALL]),
        "random_out": _job(
            tmp, "random_out", ["method=random", *SMALL, "task.steering.description=output_centric"]
        ),
    }


def _summary(frame: pd.DataFrame) -> pd.Series:
    return frame[frame["feature"].isna()].set_index("metric")["value"]


def test_diffmean_steers_better_than_the_random_control(jobs):
    diffmean, random = _summary(jobs["diffmean"]), _summary(jobs["random"])
    assert diffmean["steering_score"] > random["steering_score"], (diffmean, random)


def test_rows_carry_the_protocol(jobs):
    frame = jobs["diffmean"]
    samples = frame[frame["sample"].notna()]
    assert set(samples["metric"]) == {"concept_score", "fluency_score", "steering_score"}
    assert set(samples["kl_target"]) <= {0.1, 0.25, 0.5} and set(samples["sign"]) == {1, -1}
    # The achieved KL is within the tolerance of its target, with the sign of alpha.
    assert ((samples["kl_achieved"] - samples["kl_target"]).abs() <= 0.01).all()
    assert ((samples["alpha"] > 0) == (samples["sign"] > 0)).all()
    assert samples["text"].str.len().gt(0).mean() > 0.9
    # Every score is on the 0-2 scale or missing with a reason, never silently 0.
    scored = samples["value"].notna()
    assert samples.loc[scored, "value"].between(0, 2).all()
    assert samples.loc[~scored, "reason"].notna().all()
    # DiffMean features carry their concept label as the description.
    assert (samples["description"] == "input_centric:label").all()
    assert (samples["description_text"] == samples["concept"].str.replace("_", " ")).all()
    per_feature = frame[
        frame["metric"].isin(["best_steering_score", "heldout_steering_score"])
        & frame["feature"].notna()
    ]
    assert per_feature["feature"].nunique() == 4 and len(per_feature) == 8


def test_summary_has_intervals_and_counts(jobs):
    frame = jobs["diffmean"]
    summary = frame[frame["feature"].isna()].set_index("metric")
    for metric in ("steering_score", "heldout_steering_score"):
        row = summary.loc[metric]
        assert row["ci_low"] <= row["value"] <= row["ci_high"]
    assert summary.loc["steered_features", "value"] == 4
    assert summary.loc["alpha_search_passes", "value"] <= 10  # vs 20 bisection steps per target
    failures = summary.loc["judge_failures", "value"]
    judged = frame[frame["metric"].isin(["concept_score", "fluency_score"])]
    assert failures == judged["value"].isna().sum()


def test_output_centric_descriptions_are_promoted_tokens(jobs):
    frame = jobs["random_out"]
    samples = frame[frame["sample"].notna()]
    assert (samples["description"] == "output_centric").all()
    # Each sign is judged against its own token list.
    per_sign = samples.groupby(["feature", "sign"])["description_text"].first().unstack()
    assert (per_sign[1] != per_sign[-1]).all()
    assert not any(math.isnan(v) for v in _summary(frame)[["steering_score"]])
