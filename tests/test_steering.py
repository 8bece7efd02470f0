"""The steering task on the real embedded model and the real offline judge."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from bench.job.run import run_job
from tests.conftest import REPO

pytestmark = pytest.mark.integration

# Smaller than the defaults (CI time) but the same protocol: 4 features, 3 KL
# targets, 6 samples of 32 tokens each (3 choose the target, 3 report it); the
# default token descriptions steer the + sign only, output_centric both signs.
SMALL = [
    "task=[steering]",
    "task.steering.protocol=feature",
    "task.steering.max_features=4",
    "task.steering.kl_targets=[0.1,0.25,0.5]",
    "task.steering.samples=6",
    "task.steering.max_new_tokens=32",
    "task.steering.baseline_samples=8",
    "device=cpu",
]
HEADLINE = ["heldout_steering_score", "best_kl_steering_score", "concept_score", "fluency_score"]


def _small(key: str) -> list[str]:
    """SMALL's settings for the task configured under `task.<key>`."""
    return [o.replace("task.steering.", f"task.{key}.") for o in SMALL if o.startswith("task.")]


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
        # experiment=output_centric's pair of tasks: the same features judged against the
        # tokens they promote and against their top-activating tokens, in one job
        "random_out": _job(
            tmp,
            "random_out",
            [
                "method=random",
                "task=[steering_feature,steering_feature_tokens]",
                "task.steering_feature.description=output_centric",
                *_small("steering_feature"),
                *_small("steering_feature_tokens"),
                "device=cpu",
            ],
        ),
        **{
            f"{method}_concept": _job(
                tmp,
                f"{method}_concept",
                [
                    f"method={method}",
                    *SMALL,
                    "task.steering.protocol=concept",
                    "task.steering.concepts=2",
                ],
            )
            for method in ("diffmean", "random")
        },
    }


def test_concept_protocol_pairs_methods_over_the_same_concepts(jobs):
    """Each method steers its feature for the same 2 concepts, judged against the label;
    the headline is paired over concepts (same units hash for both methods)."""
    d, r = jobs["diffmean_concept"], jobs["random_concept"]
    per = [f[(f["metric"] == "heldout_steering_score") & f["concept"].notna()] for f in (d, r)]
    assert set(per[0]["concept"]) == set(per[1]["concept"]) and len(per[0]) == 2
    for frame in (d, r):
        samples = frame[frame["sample"].notna()]
        assert (frame["description"] == "label").all() and set(frame["sign"].dropna()) == {1}
        labels = samples.groupby("concept")["description_text"].unique()
        assert all(list(t) == [c.replace("_", " ")] for c, t in labels.items())
    heads = [
        f[(f["metric"] == "heldout_steering_score") & f["concept"].isna()].iloc[0] for f in (d, r)
    ]
    assert heads[0]["paired_over"] == "concept" and heads[0]["n"] == 2
    assert heads[0]["units_hash"] == heads[1]["units_hash"] is not None


def _summary(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["feature"].isna()].set_index("metric")


# DiffMean > random on the steering score is an empirical claim, not a property of the
# code: the default comparison (docs/findings.md) measures it over 8 concepts with its interval
# (0.18 [-0.17, 0.51], not separated), so no test asserts it on 4 features.


def test_rows_carry_the_protocol(jobs):
    frame = jobs["diffmean"]
    samples = frame[frame["sample"].notna()]
    assert set(samples["metric"]) == {"concept_score", "fluency_score", "steering_score"}
    # Token descriptions describe the + side: no other sign is searched, generated or judged.
    assert set(samples["kl_target"]) <= {0.1, 0.25, 0.5} and set(frame["sign"].dropna()) == {1}
    # The achieved KL is within the tolerance of its target, with the sign of alpha.
    assert ((samples["kl_achieved"] - samples["kl_target"]).abs() <= 0.01).all()
    assert (samples["alpha"] > 0).all()
    assert samples["text"].str.len().gt(0).mean() > 0.9
    # Every score is on the 0-2 scale or missing with a reason, never silently 0.
    scored = samples["value"].notna()
    assert samples.loc[scored, "value"].between(0, 2).all()
    assert samples.loc[~scored, "reason"].notna().all()
    # One kind of description for every feature: its top train tokens, one list per feature.
    assert (frame["description"] == "tokens").all()
    per_text = samples.groupby("feature")["description_text"].nunique()
    assert (per_text == 1).all() and (samples["description_text"] != "(no tokens)").all()
    per_feature = frame[frame["metric"].isin(HEADLINE[:2]) & frame["feature"].notna()]
    assert per_feature["feature"].nunique() == 4 and len(per_feature) == 8
    held = per_feature[per_feature["metric"] == "heldout_steering_score"]
    # The held-out value is the mean of the odd samples at the chosen target.
    for _, row in held[held["value"].notna() & held["kl_target"].notna()].iterrows():
        mine = samples[
            (samples["feature"] == row["feature"])
            & (samples["metric"] == "steering_score")
            & (samples["kl_target"] == row["kl_target"])
            & (samples["sample"] % 2 == 1)
        ]
        assert (
            row["value"] == pytest.approx(mine["value"].mean())
            and row["n"] == mine["value"].notna().sum()
        )


def test_summary_has_intervals_and_counts(jobs):
    frame = jobs["diffmean"]
    summary = _summary(frame)
    assert list(summary.index[:2]) == HEADLINE[:2]  # the headline first
    for metric in HEADLINE:
        row = summary.loc[metric]
        assert row["ci_low"] <= row["value"] <= row["ci_high"] and row["paired_over"] == "feature"
    for metric in HEADLINE[:2]:
        per_feature = frame[(frame["metric"] == metric) & frame["feature"].notna()]["value"]
        assert summary.loc[metric, "n"] == per_feature.notna().sum()
        assert summary.loc[metric, "value"] == pytest.approx(per_feature.mean())
    assert summary.loc["steered_features", "value"] == 4
    failed = frame[
        (frame["metric"] == "heldout_steering_score")
        & frame["feature"].notna()
        & (frame["value"] == 0)
        & frame["reason"].notna()
    ]
    assert summary.loc["failed_features", "value"] == len(failed)
    assert summary.loc["alpha_search_passes", "value"] <= 10  # vs 20 bisection steps per target
    judged = frame[
        frame["metric"].isin(["concept_score", "fluency_score"])
        & frame["sample"].notna()
        & frame["failure"].isna()
    ]
    assert summary.loc["judge_failures", "value"] == judged["value"].isna().sum()
    assert summary.loc["judge_failures", "n"] == len(judged)


def test_output_centric_descriptions_are_promoted_tokens(jobs):
    frame = jobs["random_out"]
    frame = frame[frame["description"] == "output_centric"]
    samples = frame[frame["sample"].notna()]
    # Each sign is judged against its own token list.
    per_sign = samples.groupby(["feature", "sign"])["description_text"].nunique().unstack()
    assert (per_sign[1] == 1).all() and (per_sign[-1] == 1).all()
    texts = samples.groupby(["feature", "sign"])["description_text"].first().unstack()
    assert (texts[1] != texts[-1]).all()
    summary = _summary(frame)
    assert not math.isnan(summary.loc["heldout_steering_score", "value"])
    held = frame[(frame["metric"] == "heldout_steering_score") & frame["feature"].notna()]
    assert set(held["sign"].dropna()) <= {1, -1}


def test_two_steering_tasks_in_one_job_judge_the_same_features_each_their_own_way(jobs):
    """experiment=output_centric's pair: both tasks steer the same sampled features; the
    token task judges the + sign against the top-activating tokens, the output-centric one
    each sign against its promoted tokens. Neither takes the other's checkpointed results
    (they once did: one checkpoint folder per protocol, so the second task's rows were the
    first's)."""
    frame = jobs["random_out"]
    samples = frame[frame["sample"].notna()]
    by_kind = {k: part for k, part in samples.groupby("description")}
    assert set(by_kind) == {"output_centric", "tokens"}
    out, tokens = by_kind["output_centric"], by_kind["tokens"]
    assert set(out["feature"]) == set(tokens["feature"]) and len(set(out["feature"])) == 4
    assert set(out["sign"]) == {1, -1} and set(tokens["sign"]) == {1}
    said = {k: part.groupby("feature")["description_text"].first() for k, part in by_kind.items()}
    plus = out[out["sign"] == 1].groupby("feature")["description_text"].first()
    assert (plus != said["tokens"]).all(), "the token task was judged against promoted tokens"
    summary = frame[frame["feature"].isna() & frame["concept"].isna() & frame["kl_target"].isna()]
    heads = summary[summary["metric"] == "judge_failures"].set_index("description")["n"]
    assert heads["output_centric"] == 2 * heads["tokens"]  # both signs judged, against one


def test_rows_of_many_units_share_batches_and_keep_the_texts_each_unit_gets_alone(
    embedded, tmp_path, caplog
):
    """The staged task generates every unit's rows (and the baseline's) in shared batches;
    each text equals what generating its unit's rows alone gives (the pre-staging path),
    because each row draws from its own seed key. Finished rows dropped from a batch
    (`COMPACT_AT`) change no text either."""

    from bench.activations.extraction import extract
    from bench.data.datasets import load
    from bench.judges.offline import OfflineJudge
    from bench.tasks.steering.generate import generate
    from bench.tasks.steering.units import Unit
    from featbench.methods.diffmean import DiffMean
    from featbench.tasks.base import TaskData
    from featbench.tasks.steering import Steering

    model, ds = embedded.model, load()
    acts = extract(model, ds, 3, "mlp_post", model_fingerprint=embedded.fingerprint)
    features = DiffMean().fit(acts.subset(ds.indices("train")))
    task = Steering(
        concepts=3,
        kl_targets=[0.1, 0.5],
        samples=4,
        max_new_tokens=24,
        baseline_samples=4,
        batch_size=128,
    )
    data = TaskData(
        dataset=ds, activations=acts, seed=42, output_dir=tmp_path, judge=OfflineJudge()
    )
    with caplog.at_level("WARNING", logger="featbench.tasks.steering"):
        rows = pd.DataFrame(task.evaluate(model, features, data, None))
    assert "no checkpoint key, so this run cannot resume" in caplog.text  # no key given here
    samples = rows[(rows["metric"] == "steering_score") & rows["sample"].notna()]
    records = [r for r in data.stage.records if r["stage"] == "steering:generate"]
    assert samples["concept"].nunique() == 3 and len(records) == 1
    assert records[0]["tokens"] > 0
    unit = features.directions / features.directions.norm(dim=1, keepdim=True)
    for key, (concept, mine) in enumerate(samples.groupby("concept", sort=True)):
        f = int(mine["feature"].iloc[0])
        jobs = sorted(
            {
                (task.kl_targets.index(r.kl_target), int(r.sign), float(r.alpha), None)
                for r in mine.itertuples()
            }
        )
        u = Unit(concept, f, key, hook=features.hook, vector=unit[f], jobs=jobs)
        alone = generate(model, features.hook, task._specs(u, 42), task)  # this unit only
        expected = {
            (task.kl_targets[t], sign, s): alone[j * task.samples + s]
            for j, (t, sign, _, _) in enumerate(jobs)
            for s in range(task.samples)
        }
        got = {(r.kl_target, r.sign, int(r.sample)): r.text for r in mine.itertuples()}
        assert got == expected, concept
