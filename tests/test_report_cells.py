"""The report's one grouping step and what renders from it: a cell is one setting (seeds
averaged, replicates averaged element-wise), named by the keys that vary; differences
between settings (paired on shared units, else unpaired; Holm-adjusted); the flags for mixed
code versions and description kinds; and `--compare paper` only in the paper's setting.

Job folders are written as bench.cli.featbench writes them, with tests/test_report.py's `write_job`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import bench.report as report_module
from bench.report import ReportError, build, report
from bench.report.cells import setting_labels
from bench.report.differences import COLUMNS
from bench.report.tables import MARK
from bench.results import read_metrics
from bench.stats import difference, holm, mean_estimate, percentile_interval
from tests.conftest import REPO
from tests.test_report import HOOK, _rows_reconstruction, setting, write_job


def _heldout(values, units: str, kind: str = "tokens", **extra) -> list[dict]:
    """A steering job's held-out headline: the mean over test units with its replicates."""
    est = mean_estimate(values, paired_over="test sentence", units_hash=units, seed=0)
    return [
        {
            "metric": "heldout_steering_score",
            **est.row(),
            "judge": "offline",
            "description": kind,
            **extra,
        }
    ]


UNITS = np.linspace(0.0, 2.0, 24)  # per-test-sentence scores


def test_setting_labels_name_the_keys_that_vary():
    block = ("smollm2-135m", 3, HOOK)
    entries = {
        "a": (block, "snmf", {"method.rank": 50, "method.init": "kmeans", "dataset.split_seed": 0}),
        "b": (
            block,
            "snmf",
            {"method.rank": 100, "method.init": "kmeans", "dataset.split_seed": 0},
        ),
        "c": (block, "random", {"method.n_features": 100, "dataset.split_seed": 1}),
        "d": (("other", 5, "x"), "snmf", {"method.rank": 7}),  # another table: alone there
    }
    assert setting_labels(entries) == {
        "a": "snmf rank=50 dataset.split_seed=0",  # init is the same for both snmf settings
        "b": "snmf rank=100 dataset.split_seed=0",
        "c": "random dataset.split_seed=1",  # method.* keys are compared within a method only
        "d": "snmf",
    }


def test_two_settings_give_two_rows_and_two_seeds_give_one(tmp_path):
    seeds = {1: UNITS, 2: UNITS[::-1] * 0.5}  # same units, different scores per seed
    for seed, values in seeds.items():
        write_job(
            tmp_path / f"r50-{seed}",
            "snmf",
            seed,
            {"steering": _heldout(values, "u")},
            keys=setting("snmf", rank=50),
        )
    write_job(
        tmp_path / "r100",
        "snmf",
        1,
        {"steering": _heldout(UNITS + 0.1, "u")},
        keys=setting("snmf", rank=100),
    )
    text = report(tmp_path).read_text()
    summary, _ = read_metrics(tmp_path / "summary.parquet")
    assert set(summary["setting"]) == {"snmf rank=50", "snmf rank=100"}
    assert summary["setting_hash"].nunique() == 2
    rows = [line for line in text.splitlines() if line.startswith("| snmf rank=")]
    assert len(rows) == 2  # two settings, two rows; the two seeds of rank=50 are one row
    reps = [
        mean_estimate(v, paired_over="test sentence", seed=0).replicates for v in seeds.values()
    ]
    low, high = percentile_interval(np.mean(reps, axis=0))
    mean = (UNITS.mean() + (UNITS * 0.5).mean()) / 2
    cell = f"| snmf rank=50 | {mean:.2f} [{low:.2f}, {high:.2f}] n=24 · 2 seeds |"
    assert cell in text
    cells = build(tmp_path).cells
    [r50] = cells[cells["setting"] == "snmf rank=50"].to_dict("records")
    assert r50["seeds"] == 2 and r50["value"] == pytest.approx(mean)
    assert (r50["ci_low"], r50["ci_high"]) == pytest.approx((low, high))


def _three_settings(root: Path) -> dict:
    """snmf and random scored on the same test sentences; diffmean on other ones."""
    values = {"snmf": UNITS + 0.3, "random": UNITS, "diffmean": UNITS[:20] + 0.2}
    units = {"snmf": "u", "random": "u", "diffmean": "other"}
    for method, v in values.items():
        write_job(root / method, method, 1, {"steering": _heldout(v, units[method])})
    return {
        m: mean_estimate(v, paired_over="test sentence", units_hash=units[m], seed=0)
        for m, v in values.items()
    }


def test_differences_are_paired_on_shared_units_and_holm_adjusted(tmp_path):
    estimates = _three_settings(tmp_path)
    text = report(tmp_path).read_text()
    diffs, _ = read_metrics(tmp_path / "differences.parquet")
    assert list(diffs.columns) == COLUMNS
    pairs = [("diffmean", "snmf"), ("diffmean", "random"), ("snmf", "random")]  # random is b
    assert list(zip(diffs["method_a"], diffs["method_b"], strict=True)) == pairs
    expected = [difference(estimates[a], estimates[b]) for a, b in pairs]
    for row, d in zip(diffs.to_dict("records"), expected, strict=True):
        assert row["paired"] == d.paired and row["n_pairs"] == d.n_pairs
        assert (row["delta"], row["ci_low"], row["ci_high"]) == pytest.approx(
            (d.delta, d.ci_low, d.ci_high)
        )
    assert list(diffs["paired"]) == [False, False, True]  # only snmf and random share units
    paired = diffs.iloc[2]
    assert paired["paired_over"] == "test sentence" and paired["ci_low"] == pytest.approx(0.3)
    assert list(diffs["p_holm"]) == pytest.approx(holm([d.p for d in expected]))
    assert max(diffs["p_holm"]) > min(d.p for d in expected)  # the adjustment did something
    assert "| heldout_steering_score | snmf | random | 0.30 [0.30, 0.30] |" in text
    assert "paired over test sentence" in text
    assert text.count("unpaired (bootstrap of independent units) |") == 2
    assert "Holm-adjusted over the family of every difference in that table" in text
    assert "Holm family: 3 p-values." in text


def test_a_difference_that_does_not_separate_states_the_units_needed(tmp_path):
    noisy = np.random.default_rng(0).normal(1.0, 0.5, 24)
    write_job(tmp_path / "a", "snmf", 1, {"steering": _heldout(noisy, "u")})
    write_job(tmp_path / "b", "random", 1, {"steering": _heldout(noisy[::-1] + 0.01, "u")})
    report(tmp_path)
    diffs, _ = read_metrics(tmp_path / "differences.parquet")
    [row] = diffs.to_dict("records")
    assert row["ci_low"] < 0 < row["ci_high"] and row["n_for_power"] > 24
    text = (tmp_path / "report.md").read_text()
    assert f"{row['n_for_power']} units to separate at 80% power" in text


def test_mixed_description_kinds_are_flagged_and_never_compared(tmp_path):
    write_job(tmp_path / "a", "snmf", 1, {"steering": _heldout(UNITS, "u", kind="tokens")})
    write_job(tmp_path / "b", "diffmean", 1, {"steering": _heldout(UNITS, "u", kind="label")})
    text = report(tmp_path).read_text()
    table = text.split("### Steering")[1]
    assert table.index(
        "WARNING: these steering cells were judged against different "
        "description kinds (label, tokens)"
    ) < table.index("| setting |")
    diffs, _ = read_metrics(tmp_path / "differences.parquet")
    assert diffs.empty


def test_two_protocols_judged_against_their_own_kinds_are_not_flagged(tmp_path):
    """The concept protocol judges labels and the feature protocol tokens: two columns of
    one table, each of one kind; the warning is for a column that mixes kinds."""
    rows = [{**r, "protocol": "concept"} for r in _heldout(UNITS, "u", kind="label")]
    rows += [{**r, "protocol": "feature"} for r in _heldout(UNITS, "v", kind="tokens")]
    for name in ("snmf", "random"):
        write_job(tmp_path / name, name, 1, {"steering": rows})
    table = report(tmp_path).read_text().split("### Steering")[1]
    assert "different description kinds" not in table


def test_a_table_mixing_code_identities_says_so_and_lists_them(tmp_path):
    """Jobs reused across commits that did not change what computes (same code digest) mix
    freely; jobs of code that computes differently are flagged with their digests."""
    old, new = "featbench 0.1.0+g1111111", "featbench 0.1.0+g2222222.dirty-abcd"
    write_job(tmp_path / "a", "snmf", 1, {"reconstruction": _rows_reconstruction(0.2)}, code=old)
    write_job(tmp_path / "b", "pca", 1, {"reconstruction": _rows_reconstruction(0.3)}, code=new)
    table = report(tmp_path).read_text().split("### Reconstruction")[1]
    assert "These rows mix" not in table  # two commits, one code identity
    write_job(
        tmp_path / "b",
        "pca",
        1,
        {"reconstruction": _rows_reconstruction(0.3)},
        code=new,
        digest="digest1",
    )
    table = report(tmp_path).read_text().split("### Reconstruction")[1]
    flag = f"These rows mix results from 2 code identities: digest0 ({old}); digest1 ({new})."
    assert flag in table and table.index(flag) < table.index("| setting |")
    write_job(tmp_path / "c", "nmf", 1, {"reconstruction": _rows_reconstruction(0.3)}, code=new)
    table = report(tmp_path).read_text().split("### Reconstruction")[1]
    flag = (
        f"These rows mix results from 2 code identities: digest0 ({old}, {new}); digest1 ({new})."
    )
    assert flag in table and table.index(flag) < table.index("| setting |")


def test_jobs_from_older_code_fall_back_to_their_config_hash(tmp_path, caplog):
    for seed in (1, 2):  # no setting_hash column, no meta: each job is its own setting
        write_job(
            tmp_path / str(seed),
            "snmf",
            seed,
            {"reconstruction": _rows_reconstruction(0.2)},
            meta=False,
        )
    with caplog.at_level("WARNING", logger="bench.report"):
        text = report(tmp_path).read_text()
    assert any(
        "written by older code have no setting_hash" in r.getMessage() for r in caplog.records
    )
    rows = [line for line in text.splitlines() if line.startswith("| snmf config=")]
    assert len(rows) == 2 and all("seeds" not in line for line in rows)


PAPER = "gpt-4o-mini"
REFERENCE = (
    "model,layer,hook,method,rank,sparsity,init,metric,value,std,bound,source,confidence,note\n"
    "smollm2-135m,3,mlp_post,snmf,100,0.01,random,best_kl_steering_score,0.45,0.32,,Table 2,high,x\n"
    "smollm2-135m,3,mlp_post,snmf,100,0.01,random,s_cd,2.99,1.55,,Table 3,high,per feature\n"
    "smollm2-135m,,mlp_post,snmf,100,0.01,random,frac_s_cd_positive,0.75,,lower,text,low,x\n"
    "gemma-2-2b,12,mlp_post,SAE,,,,best_kl_steering_score,0.9,,,Table 2,high,x\n"
)


def _paper_sweep(root: Path) -> None:
    """snmf in the paper's setting (and judge), and snmf rank 50 kmeans judged offline."""
    for name, keys, judge in (
        ("paper", setting("snmf", rank=100, sparsity=0.01, init="random"), PAPER),
        ("ours", setting("snmf", rank=50, sparsity=0.01, init="kmeans"), "offline"),
    ):
        keys = {**keys, "judge.model": judge}
        steering = [{"metric": "best_kl_steering_score", "value": 0.4, "n": 10, "judge": judge}]
        concept = [
            {"feature": f, "metric": "s_cd", "value": v, "encoder": "projection"}
            for f, v in enumerate((1.0, 2.0, 3.0))
        ]
        concept += [
            {"metric": "s_cd", "value": 9.0, "encoder": "projection"},  # not per feature
            {"metric": "frac_s_cd_positive", "value": 0.8, "encoder": "projection"},
        ]
        write_job(
            root / name, "snmf", 1, {"steering": steering, "concept_detection": concept}, keys=keys
        )


def test_compare_paper_puts_a_value_beside_ours_only_in_the_papers_setting(tmp_path, monkeypatch):
    root = tmp_path / "sweep"
    _paper_sweep(root)
    monkeypatch.setattr(report_module, "PAPER_REFERENCE", tmp_path / "absent.csv")
    with pytest.raises(ReportError, match="absent.csv does not exist"):
        report(root, compare="paper")
    assert not (root / "report.md").exists()
    (tmp_path / "reference.csv").write_text(REFERENCE)
    monkeypatch.setattr(report_module, "PAPER_REFERENCE", tmp_path / "reference.csv")
    section = report(root, compare="paper").read_text().split("## Comparison with the paper")[1]
    lines = [line for line in section.splitlines() if line.startswith("| smollm2")]
    same = [line for line in lines if "rank=100" in line]
    differs = [line for line in lines if "rank=50" in line]
    assert len(same) == len(differs) == 3  # steering, s_cd (per feature), frac_s_cd_positive
    assert all(line.endswith("| same setting |") for line in same)
    assert any("| best_kl_steering_score | 0.40 n=10 | 0.45 ± 0.32 |" in line for line in same)
    per_feature = (
        "| s_cd (mean over features, projection) | 2.00 ± 1.00 (n=3 features) | 2.99 ± 1.55 |"
    )
    assert any(per_feature in line for line in same) and "9.00" not in section
    assert any("| ≥ 0.75 |" in line and "| 0.80" in line for line in same)  # no layer fixed
    for line in differs:  # mismatched: named, and no number of ours beside the paper's
        assert "rank: ours 50, paper 100; init: ours kmeans, paper random" in line
        assert line.split(" | ")[2] == "—"
    assert f"judge: ours offline, paper {PAPER}" in differs[0]
    assert "1 reference rows match no result here" in section


def test_paper_reference_is_package_data():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "bench.reference" in config["packages"]
    assert config["package-dir"]["bench.reference"] == "results"
    assert config["package-data"]["bench.reference"] == ["paper_reference.csv"]
    packaged = report_module.paper.packaged_reference()
    assert packaged.read_bytes() == (REPO / "results" / "paper_reference.csv").read_bytes()
    assert len(report_module.read_reference("paper")) >= 20


def test_a_task_class_that_does_not_import_is_left_out_with_a_warning(tmp_path, caplog):
    """Issue 25: a job from code that recorded no declaration names its task class; one
    that no longer imports used to be logged at debug level only."""
    keys = {**setting("snmf"), "task.reconstruction._target_": "nowhere.Task"}
    write_job(
        tmp_path / "a",
        "snmf",
        1,
        {"reconstruction": _rows_reconstruction(0.2)},
        keys=keys,
        declare=False,
    )
    with caplog.at_level("WARNING", logger="bench.report"):
        text = report(tmp_path).read_text()
    assert "`task nowhere.Task`: no declaration" in text and "item(s) left out" in text
    assert any("nowhere.Task" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_a_difference_whose_interval_excludes_0_but_not_holm_says_so():
    """Issue 25: the README named a "the interval excludes 0, Holm does not" case that the
    report never wrote; it called every interval that excludes 0 "separated"."""
    from bench.report.differences import _md_row

    row = {
        "metric": "fvu",
        "encoder": None,
        "protocol": None,
        "delta": 0.01,
        "ci_low": 0.001,
        "ci_high": 0.03,
        "paired": True,
        "paired_over": "test sentence",
        "n_for_power": 40,
        "p_holm": 0.48,
        "setting_a": "snmf",
        "setting_b": "random",
        "n_pairs": 30,
    }
    assert _md_row(row)[-1] == "interval excludes 0; Holm does not"
    assert _md_row({**row, "p_holm": 0.01})[-1] == "separated"
    assert _md_row({**row, "ci_low": -0.01})[-1] == "40 units to separate at 80% power"


def test_jobs_from_before_the_seed_left_the_config_share_cells_with_new_ones(tmp_path):
    """Older code resolved the setting with the seed as a placeholder, so `method.seed:
    <seed>` was one of its keys; the report drops it, and an old and a new job of the same
    setting land in one cell, their seeds averaged."""
    from bench.core.storage import sha256_json

    keys = setting("snmf")
    write_job(tmp_path / "new", "snmf", 1, {"reconstruction": _rows_reconstruction(0.2)}, keys=keys)
    legacy = {**keys, "method.seed": "<seed>"}
    write_job(
        tmp_path / "old", "snmf", 2, {"reconstruction": _rows_reconstruction(0.3)}, keys=legacy
    )
    assert sha256_json(legacy)[:16] != sha256_json(keys)[:16]
    text = report(tmp_path).read_text().split("### Reconstruction")[1]
    assert "2 seeds" in text and text.count("| snmf") == 1


def test_the_ranking_orders_settings_by_the_steering_headline_with_every_pair(tmp_path):
    """ranking.md (issue 23): per block and protocol, the settings best first with their
    interval and their difference from random, then every pair's differences."""
    from bench.stats import mean_estimate

    def steering(values):
        est = mean_estimate(values, paired_over="concept", units_hash="u", seed=0)
        return {
            "steering": [
                {
                    "metric": "heldout_steering_score",
                    **est.row(),
                    "protocol": "concept",
                    "description": "label",
                }
            ]
        }

    base = np.random.default_rng(0).uniform(0, 1, 16)
    for name, shift in (("random", 0.0), ("snmf", 0.1), ("diffmean", 0.8)):
        write_job(tmp_path / name, name, 1, steering(base + shift))
    report(tmp_path)
    text = (tmp_path / "ranking.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[1] for r in rows] == ["diffmean", "snmf", "random"]
    assert "concept protocol" in text and "diffmean − snmf" in text and "snmf − random" in text


def test_the_ranking_samples_are_the_held_out_texts_at_the_chosen_target():
    """ranking.md's samples (issue 23): per setting, three texts of the reported (odd)
    half at the (KL target, sign) chosen on the other half, for a concept every setting
    steered, from each setting's first seed."""
    import pandas as pd

    from bench.report.ranking import samples_section

    rows = []
    for name, seed in (("snmf", 43), ("snmf", 42), ("random", 42)):
        job = f"{name}-{seed}"
        for concept in ("animals", "zoo"):
            if concept == "zoo" and name == "random":
                continue  # not steered by every setting: never the shown concept
            rows.append(
                {
                    "task": "steering",
                    "protocol": "concept",
                    "setting": name,
                    "seed": seed,
                    "job_dir": job,
                    "concept": concept,
                    "metric": "heldout_steering_score",
                    "kl_target": 0.5,
                    "sign": -1,
                    "sample": np.nan,
                    "value": 0.25,
                    "text": None,
                }
            )
            for kl in (0.1, 0.5):
                for sample in range(8):
                    rows.append(
                        {
                            "task": "steering",
                            "protocol": "concept",
                            "setting": name,
                            "seed": seed,
                            "job_dir": job,
                            "concept": concept,
                            "metric": "steering_score",
                            "kl_target": kl,
                            "sign": -1,
                            "sample": float(sample),
                            "value": 1.0,
                            "text": f"{job} {concept} kl{kl} s{sample}",
                        }
                    )
    text = samples_section(pd.DataFrame(rows))
    assert "`animals`" in text and "zoo" not in text
    assert "**snmf** (seed 42, KL 0.50, sign -1; held-out score 0.25)" in text
    for job in ("snmf-42", "random-42"):
        shown = [f"{job} animals kl0.5 s{s}" for s in (1, 3, 5)]
        assert all(t in text for t in shown)
        assert f"{job} animals kl0.5 s0" not in text and f"{job} animals kl0.1" not in text
    assert "snmf-43" not in text


def test_a_cell_is_marked_by_its_own_description_kinds_difference_from_random(tmp_path):
    """The feature protocol judged against two description kinds in one job (the
    output-centric experiment's pair of steering tasks, one table): each kind's cell carries
    its own mark. SNMF clears random on one kind and ties it on the other; the first cell is
    marked and the second is not (one key for both had marked neither)."""
    low = np.linspace(0.0, 0.2, 24)
    for name, promoted in (("snmf", UNITS + 1.0), ("random", UNITS)):
        rows = _heldout(promoted, "u", kind="output_centric") + _heldout(low, "u", kind="tokens")
        write_job(
            tmp_path / name, name, 1, {"steering": [{**r, "protocol": "feature"} for r in rows]}
        )
    table = report(tmp_path).read_text().split("### Steering")[1].split("\n## ")[0]
    [snmf_row] = [line for line in table.splitlines() if line.startswith("| snmf |")]
    cells = [c.strip() for c in snmf_row.split("|")[2:4]]
    assert cells[0].startswith("2.00") and cells[1].startswith("0.10"), snmf_row
    assert cells[0].endswith(f" {MARK}") and not cells[1].endswith(f" {MARK}"), snmf_row
