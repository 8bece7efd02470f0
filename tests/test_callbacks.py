"""The console comparison table, per-job plots and the Hydra `ReportCallback`.

Fixtures are small synthetic jobs written with the real result writer
(`finalize` + `write_metrics` + `write_replicates`, through tests/test_report.py's
`write_job`), read back with `bench.report.build` as the callback reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from bench.cli.callbacks import ReportCallback
from bench.errors import SweepFailed, error_line
from bench.report import build, comparison_table, plot_job
from bench.report.tables import LEGEND, MARK
from bench.results import FAILED_LEDGER, finalize, write_metrics
from bench.stats import mean_estimate
from featbench.tasks.concept_detection import ConceptDetection
from featbench.tasks.reconstruction import Reconstruction
from featbench.tasks.steering import Steering
from tests.test_report import write_job

HOOK = "blocks.3.mlp.hook_post"
# What a job of this code records about its tasks (featbench.tasks.base.Task.declaration).
META = {"tasks": {c.name: c.declaration() for c in (ConceptDetection, Steering, Reconstruction)}}
PNG = b"\x89PNG\r\n\x1a\n"


def _job(method: str, seed: int = 1, supervised: bool = False) -> pd.DataFrame:
    """One job's rows: per-feature AUROCs and steering samples plus their summary rows."""
    run = {
        "run_id": f"{method}-{seed}",
        "model": "smollm2-135m",
        "layer": 3,
        "hook": HOOK,
        "method": method,
        "seed": seed,
        "config_hash": f"hash{seed}",
        "setting_hash": method,
        "code_version": "featbench 0.1.0",
        "code_digest": "digest0",
        "dataset_hash": "d0",
        "dataset_version": "1",
    }
    concept = [
        {"feature": f, "concept": "food", "metric": "auroc", "value": v}
        for f, v in enumerate((0.9, 0.7))
    ]
    concept += [
        {"metric": "mean_feature_auroc", "value": 0.925, "ci_low": 0.9, "ci_high": 0.95},
        {"metric": "concept_coverage", "value": 0.5},
    ]
    concept = [{**r, "encoder": "native"} for r in concept]
    steering = [
        {
            "feature": 0,
            "concept": "food",
            "kl_target": kl,
            "sign": 1,
            "sample": s,
            "metric": "steering_score",
            "value": v,
            "judge": "offline",
        }
        for kl in (0.1, 0.5)
        for s, v in enumerate((2.0, 1.0))
    ]
    steering.append({"metric": "heldout_steering_score", "value": 0.35, "judge": "offline"})
    frames = [
        finalize(rows, {**run, "task": task})
        for task, rows in (("concept_detection", concept), ("steering", steering))
    ]
    return pd.concat(frames, ignore_index=True).assign(supervised=supervised)


def _reconstruction_only(method: str) -> pd.DataFrame:
    run = {
        "run_id": f"{method}-0",
        "model": "smollm2-135m",
        "layer": 3,
        "hook": HOOK,
        "method": method,
        "seed": 0,
        "config_hash": "hash0",
        "task": "reconstruction",
        "setting_hash": method,
        "code_version": "featbench 0.1.0",
        "code_digest": "digest0",
        "dataset_hash": "d0",
        "dataset_version": "1",
    }
    return finalize(
        [
            {"metric": "fvu", "value": 0.2},
            {"metric": "kl_spliced", "value": None, "reason": "no model"},
        ],
        run,
    )


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    """Three jobs: diffmean (supervised), snmf and pca (reconstruction only)."""
    root = tmp_path / "sweep"
    write_metrics(_job("diffmean", supervised=True), root / "0" / "metrics.parquet", META)
    write_metrics(_job("snmf"), root / "1" / "metrics.parquet", META)
    write_metrics(_reconstruction_only("pca"), root / "2" / "metrics.parquet", META)
    return root


def _table(root: Path) -> str:
    built = build(root)
    return comparison_table(built.cells, built.differences)


def test_comparison_table_leads_with_heldout_steering_and_shows_missing_cells(sweep):
    lines = _table(sweep).splitlines()
    assert lines[0] == f"smollm2-135m · layer 3 · {HOOK}"
    header = lines[1].split()
    assert header == [
        "setting",
        "heldout_steering_score",
        "↑",
        "mean_feature_auroc",
        "(native)",
        "↑",
        "concept_coverage",
        "(native)",
        "↑",
        "fvu",
        "↓",
        "kl_spliced",
        "↓",
    ]
    assert set(lines[2]) == {"-", " "}
    diffmean = next(line for line in lines if line.startswith("diffmean †"))
    assert "0.93 [0.90, 0.95]" in diffmean and "0.50" in diffmean and "0.35" in diffmean
    assert diffmean.split()[-2:] == ["—", "—"]  # no reconstruction for diffmean
    pca = next(line for line in lines if line.startswith("pca"))
    assert pca.split()[1:] == ["—", "—", "—", "0.20", "—"]  # kl_spliced: missing value
    assert lines[-1].startswith("† supervised")
    assert MARK not in "\n".join(lines)  # no random control here: nothing marked
    assert "|" not in "\n".join(lines)  # terminal text, not markdown
    assert diffmean.index("0.50") == lines[1].index("concept_coverage")  # columns line up


def test_comparison_table_has_one_block_per_model_layer_and_hook(tmp_path):
    write_metrics(_job("snmf"), tmp_path / "0" / "metrics.parquet", META)
    other = _job("snmf").assign(layer=5, hook="blocks.5.mlp.hook_post", setting_hash="snmf5")
    write_metrics(other, tmp_path / "1" / "metrics.parquet", META)
    blocks = _table(tmp_path).split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == [
        f"smollm2-135m · layer 3 · {HOOK}",
        "smollm2-135m · layer 5 · blocks.5.mlp.hook_post",
    ]
    assert all(sum(line.startswith("snmf") for line in b.splitlines()) == 1 for b in blocks)


def _heldout(values) -> dict[str, list[dict]]:
    est = mean_estimate(values, paired_over="test sentence", units_hash="u", seed=0)
    return {
        "steering": [{"metric": "heldout_steering_score", **est.row(), "description": "tokens"}]
    }


def test_only_a_difference_from_random_that_excludes_0_is_marked(tmp_path):
    scores = np.random.default_rng(0).uniform(0, 2, 30)
    write_job(tmp_path / "r", "random", 1, _heldout(scores))
    write_job(tmp_path / "s", "snmf", 1, _heldout(scores + 0.5))  # separates from random
    write_job(tmp_path / "d", "diffmean", 1, _heldout(scores[::-1]))  # same units, shuffled
    built = build(tmp_path)
    table = comparison_table(built.cells, built.differences)
    rows = {line.split()[0]: line for line in table.splitlines()[3:6]}
    diffs = built.differences
    for method in ("snmf", "diffmean"):
        vs_random = diffs[diffs["method_a"].eq(method) & diffs["method_b"].eq("random")].iloc[0]
        assert vs_random["paired"]
        excludes = vs_random["ci_low"] > 0 or vs_random["ci_high"] < 0
        assert rows[method].rstrip().endswith(MARK) == excludes, (method, vs_random)
    assert rows["snmf"].endswith(MARK) and not rows["diffmean"].endswith(MARK)
    assert not rows["random"].endswith(MARK)
    assert table.splitlines()[-1] == LEGEND


def test_plot_job_writes_the_plots_that_apply(tmp_path):
    info = {"loss_curve": [4.0, 2.0, 1.0, 0.5]}
    paths = plot_job(_job("snmf"), tmp_path / "plots", info=info)
    names = ["steering_headline.png", "steering_vs_kl.png", "auroc_by_method.png", "snmf_loss.png"]
    assert paths == [tmp_path / "plots" / name for name in names]
    for path in paths:
        assert path.read_bytes()[:8] == PNG
        with Image.open(path) as image:
            image.verify()
    assert plot_job(_job("snmf"), tmp_path / "two") == [
        tmp_path / "two" / name for name in names[:3]
    ]


def test_the_steering_plots_carry_95_percent_intervals():
    """Issue 23: the plots showed means only. The KL curve's points have an interval over
    units, and the headline plot has each setting's interval."""
    from bench.report.series import plot_series

    series = plot_series(_job("snmf"))
    kl = series.steering_vs_kl
    assert list(kl["kl_target"]) == [0.1, 0.5] and (kl["n"] == 1).all()  # one feature: one unit
    assert (kl["ci_low"] <= kl["value"]).all() and (kl["value"] <= kl["ci_high"]).all()
    assert list(series.headline["value"]) == [0.35]
    assert list(series.headline["protocol"]) == ["concept"]


def test_plot_job_returns_nothing_without_plottable_rows(tmp_path):
    assert plot_job(_reconstruction_only("pca"), tmp_path) == []
    assert not list(tmp_path.iterdir())


def test_callback_reports_the_sweep_and_logs_the_table(sweep, caplog):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with caplog.at_level("INFO", logger="bench.cli.callbacks"):
        ReportCallback().on_multirun_end(config)
    assert (sweep / "report.md").is_file() and (sweep / "summary.parquet").is_file()
    messages = [r.getMessage() for r in caplog.records if r.name == "bench.cli.callbacks"]
    table = next(m for m in messages if m.startswith("headline metrics"))
    assert "diffmean †" in table and "0.93 [0.90, 0.95]" in table and "pca" in table
    assert table.splitlines()[2].split()[:2] == ["setting", "heldout_steering_score"]
    assert f"report: {sweep / 'report.md'}" in messages
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize("make", ["empty", "absent"])
def test_a_sweep_without_results_logs_an_error_and_leaves_the_verdict_to_its_jobs(
    tmp_path, caplog, make
):
    sweep = tmp_path / "sweep"
    if make != "absent":
        sweep.mkdir()
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with caplog.at_level("INFO", logger="bench.cli.callbacks"):
        ReportCallback().on_multirun_end(config)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(sweep) in errors[0]
    assert "no job wrote metrics.parquet" in errors[0]
    assert not (sweep / "report.md").exists()


def test_a_report_that_cannot_be_built_fails_the_sweep_and_keeps_the_results(tmp_path, caplog):
    """Issue 25: an unreadable job's report is an error the user can fix (exit 2)."""
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "metrics.parquet").write_bytes(b"not a parquet file")
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with caplog.at_level("INFO", logger="bench.cli.callbacks"), pytest.raises(SweepFailed) as exit:
        ReportCallback().on_multirun_end(config)
    assert exit.value.exit_code == 2 and exit.value.failed == 0
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "unreadable metrics file" in errors[0] and "results are kept" in errors[0]
    assert (sweep / "0" / "metrics.parquet").read_bytes() == b"not a parquet file"


def test_a_report_that_crashes_fails_the_sweep_naming_the_error(sweep, caplog, monkeypatch):
    """Issue 25: a bug in the report used to be logged while the sweep exited 0."""
    import bench.cli.callbacks as callbacks

    def boom(directory):
        raise RuntimeError("\nbug in the report")

    monkeypatch.setattr(callbacks, "build", boom)
    before = {p: p.read_bytes() for p in sweep.rglob("metrics.parquet")}
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with caplog.at_level("INFO", logger="bench.cli.callbacks"), pytest.raises(SweepFailed) as exit:
        ReportCallback().on_multirun_end(config)
    assert exit.value.exit_code == 1
    errors = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "RuntimeError: bug in the report" in errors and "results are kept" in errors
    assert before and {p: p.read_bytes() for p in sweep.rglob("metrics.parquet")} == before


def test_a_failure_recorded_only_in_the_ledger_fails_the_sweep_and_names_the_rescue(
    tmp_path, caplog
):
    """A job whose folder refused failed.json is recorded in the sweep's ledger."""
    sweep = tmp_path / "sweep"
    ledger = sweep / FAILED_LEDGER
    ledger.mkdir(parents=True)
    record = {"error": "ResultsError: cannot write", "exit_code": 2, "rescued": "/tmp/r/x"}
    (ledger / "method=snmf.json").write_text(json.dumps(record))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with caplog.at_level("INFO", logger="bench.cli.callbacks"), pytest.raises(SweepFailed) as exit:
        ReportCallback().on_multirun_end(config)
    assert exit.value.exit_code == 2 and exit.value.failed == 1
    errors = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "method=snmf" in errors and "/tmp/r/x" in errors
    ReportCallback().on_multirun_start(config)  # a new run of the sweep starts afresh
    assert not ledger.exists()


def test_a_failure_message_that_begins_with_a_newline_keeps_its_words():
    """Issue 25: `RuntimeError("\\nthe real message")` used to read `RuntimeError: `."""
    assert error_line(RuntimeError("\nthe real\n message")) == "RuntimeError: the real message"
    assert error_line(KeyError()) == "KeyError"


def test_job_start_logs_the_job_number_and_overrides(caplog):
    callback = ReportCallback()
    job = {"num": 3, "override_dirname": "method=snmf,seed=2"}
    with caplog.at_level("INFO", logger="bench.cli.callbacks"):
        callback.on_job_start(OmegaConf.create({"hydra": {"job": job}}), task_function=None)
        callback.on_job_start(OmegaConf.create({"hydra": {"job": {"num": 0}}}))
        callback.on_job_start(OmegaConf.create({}))  # a single run: no job number, no line
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["job 3: method=snmf,seed=2", "job 0: defaults"]


def test_failed_jobs_are_listed_and_set_the_exit_code(tmp_path, caplog):
    sweep = tmp_path / "sweep"
    for name, code in (("method=snmf", 2), ("method=random", 1)):
        (sweep / name).mkdir(parents=True)
        record = {"error": f"ConfigError: bad {name}", "exit_code": code}
        (sweep / name / "failed.json").write_text(json.dumps(record))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with caplog.at_level("INFO", logger="bench.cli.callbacks"), pytest.raises(SweepFailed) as exit:
        ReportCallback().on_multirun_end(config)
    assert exit.value.code == exit.value.exit_code == 2 and exit.value.failed == 2
    assert isinstance(exit.value, SystemExit)  # Hydra swallows a callback's other exceptions
    errors = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "bad method=snmf" in errors and "bad method=random" in errors
    assert "2 job(s) of the sweep failed" in errors
