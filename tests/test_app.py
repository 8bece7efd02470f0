"""The `featbench` command end to end, as a user runs it (subprocess, another cwd)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest

from bench.results import SCHEMA, read_metrics
from tests.conftest import REPO, featbench_cmd

pytestmark = pytest.mark.integration

FAKE_KEY = "fake-featbench-secret-value-0123456789"  # planted, must never reach a file
SECRET_VARIABLES = ("OPENAI_API_KEY", "WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def _run(args, cwd, timeout=600, extra_env=None):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(extra_env or {})}
    return subprocess.run(
        featbench_cmd() + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_smoke_experiment_writes_tidy_results(tmp_path, embedded):
    out = _run(
        [
            "experiment=smoke",
            f"paths.results_dir={tmp_path / 'res'}",
        ],
        cwd=tmp_path,
        # The key sits in every variable a user's secrets live in; the default logger
        # (W&B, offline) runs too, so its files are searched as well. (Redaction of
        # secret-named config keys: test_core_units.py and test_tracking.py.)
        extra_env={name: FAKE_KEY for name in SECRET_VARIABLES},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [metrics] = list((tmp_path / "res").rglob("metrics.parquet"))
    frame, meta = read_metrics(metrics)
    assert list(frame.columns[: len(SCHEMA)]) == list(SCHEMA)
    assert set(frame["method"]) == {"diffmean"}
    assert set(frame["task"]) == {
        "concept_detection",
        "synthetic_recovery",
        "steering",
    }  # no decoder: no reconstruction
    steering = frame[(frame["task"] == "steering") & frame["feature"].isna()]
    assert {"heldout_steering_score", "best_kl_steering_score", "judge_failures"} <= set(
        steering["metric"]
    )
    headline = steering.set_index("metric").loc["heldout_steering_score"]
    assert headline["ci_low"] <= headline["value"] <= headline["ci_high"] and headline["n"] >= 1
    assert (frame["model"] == "smollm2-135m").all() and (frame["layer"] == 3).all()
    assert (frame["hook"] == "blocks.3.mlp.hook_post").all()
    summary = frame[frame["feature"].isna() & frame["concept"].isna()]
    native = summary[summary["encoder"] == "native"].set_index("metric")
    assert {"mean_feature_auroc", "concept_coverage", "frac_s_cd_positive", "dead_features"} <= set(
        native.index
    )
    assert set(summary["encoder"].dropna()) == {"native", "projection"}
    # DiffMean is fitted with the labels: on 6 concepts it detects them far above chance
    # (0.5), and its interval over test sentences brackets the value.
    auroc = native.loc["mean_feature_auroc"]
    assert auroc["value"] > 0.8 and auroc["ci_low"] <= auroc["value"] <= auroc["ci_high"]
    assert auroc["paired_over"] == "test sentence" and auroc["n"] > 0
    assert frame["config_hash"].nunique() == 1 and frame["setting_hash"].nunique() == 1
    assert frame["code_version"].str.startswith("featbench ").all()
    assert (frame["dataset_version"] == "concepts-v2").all() and frame["dataset_hash"].notna().all()
    assert meta["versions"]["transformer-lens"] and meta["versions"]["torch"]
    job = metrics.parent
    assert (job / "config.yaml").is_file() and (job / "features" / "features.json").is_file()
    # The artifact says where it came from.
    provenance = json.loads((job / "features" / "features.json").read_text())["provenance"]
    assert provenance["model"] == "smollm2-135m" and provenance["layer"] == 3
    assert provenance["config_hash"] == frame["config_hash"].iloc[0]
    assert provenance["dataset_hash"] == frame["dataset_hash"].iloc[0]
    assert (
        len(provenance["model_fingerprint"]) == 16 and provenance["hook"] == frame["hook"].iloc[0]
    )
    # The secret never lands in any output file (config, parquet metadata, logs, W&B).
    assert list(job.glob("wandb/offline-run-*")), "the default W&B logger wrote no run"
    for file in (tmp_path / "res").rglob("*"):
        if file.is_file():
            assert FAKE_KEY.encode() not in file.read_bytes(), file
    printed = out.stderr + out.stdout
    assert "done:" in printed and re.search(r"concept_detection\s+mean_feature_auroc", printed)
    assert "report: " in printed and (metrics.parents[1] / "report.md").is_file()


def test_literal_secrets_on_the_command_line_are_refused(tmp_path):
    multirun = ["-m", "method=diffmean,random", "+logger.wandb_api_key=" + FAKE_KEY]
    for args in (["+judge.api_key=" + FAKE_KEY], multirun):
        out = _run(args + [f"paths.results_dir={tmp_path}"], cwd=tmp_path, timeout=120)
        assert out.returncode == 2 and "environment variable" in out.stderr
        assert FAKE_KEY not in out.stderr + out.stdout
    assert not any(tmp_path.rglob("*.yaml")) and not any(tmp_path.rglob("*.log"))


def test_unknown_group_option_lists_the_choices(tmp_path):
    out = _run(["model=nope"], cwd=tmp_path, timeout=120)
    assert out.returncode != 0
    assert "Could not find 'model/nope'" in out.stderr and "smollm2-135m" in out.stderr
    assert "Traceback" not in out.stderr


def test_an_unknown_entry_of_a_list_group_lists_the_choices_too(tmp_path):
    """Issue 25: `task=[nonexistent]` printed Hydra's "Could not load 'task/nonexistent'"
    and its search path, but not the tasks that exist (`method=nonexistent` does)."""
    out = _run(["task=[nonexistent]"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "Available options in 'task':" in out.stderr
    for name in ("concept_detection", "reconstruction", "steering", "synthetic_recovery"):
        assert name in out.stderr.split("Available options in 'task':")[1]


@pytest.mark.parametrize("module", ["bench", "bench.cli.featbench"])
def test_python_dash_m_runs_a_job_to_the_end_and_prints_its_headline(tmp_path, embedded, module):
    """Issue 25: `python -m bench.run` (conftest's fallback) defined `headline` after its
    `__main__` guard, so it raised NameError when a job finished. `python -m bench` is the
    fallback now; the command's own module runs to the end too."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            module,
            "experiment=smoke",
            "method=random",
            "task=[concept_detection]",
            "hydra.mode=RUN",
            "logger=none",
            f"paths.results_dir={tmp_path / 'res'}",
        ],
        cwd=tmp_path,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mean_feature_auroc native" in out.stdout + out.stderr  # the headline, printed


def test_unknown_key_is_hydras_error(tmp_path):
    out = _run(["not_a_key=1"], cwd=tmp_path, timeout=120)
    assert out.returncode != 0 and "not_a_key" in out.stderr and "Traceback" not in out.stderr
    out = _run(["dataset.not_a_field=1"], cwd=tmp_path, timeout=120)
    assert out.returncode != 0 and "not_a_field" in out.stderr and "Traceback" not in out.stderr


def test_bad_values_fail_before_the_model_loads(tmp_path):
    for args, message in [
        (["layer=99"], "layer=99 is outside smollm2-135m: valid layers are 0..29"),
        (["hook=mlp_pre"], "hook='mlp_pre' is not allowed; choose one of"),
        (["dataset.path=/nonexistent/file.jsonl"], "/nonexistent/file.jsonl: no such dataset file"),
        (["method._target_=nowhere.Method"], "method 'nowhere.Method' could not be built"),
        # issue 18: an endpoint that refuses connections, found by one request (port 9: no
        # server), and a rank the hook cannot hold, both before the model loads
        (
            [
                "judge=openai",
                "judge.base_url=http://127.0.0.1:9/v1",
                "judge.api_key_env=null",
                "task=[steering]",
            ],
            "the judge endpoint http://127.0.0.1:9/v1/models cannot be reached",
        ),
        (
            ["method=snmf", "method.rank=4000", "hook=mlp_post"],
            "rank 4000 exceeds the mlp_post width of smollm2",
        ),
    ]:
        out = _run(args + [f"paths.results_dir={tmp_path}"], cwd=tmp_path, timeout=120)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        assert message in out.stderr + out.stdout, (args, out.stderr[-2000:])
        assert "Traceback" not in out.stderr
        assert "loaded on" not in out.stderr + out.stdout  # no model was loaded


def test_non_editable_install_finds_config_from_any_directory(tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import bench, sys; print(bench.__file__); sys.argv=['featbench','--cfg','job']; from bench.cli.featbench import cli; cli()",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[0].startswith(str(site))
    assert (
        "name: smollm2-135m" in out.stdout
        and "_target_: featbench.methods.diffmean.DiffMean" in out.stdout
    )
    assert (site / "bench" / "data" / "concepts.jsonl").is_file()
    assert pd.read_json(site / "bench" / "data" / "concepts.jsonl", lines=True).shape[0] >= 660


def test_configuration_errors_are_exit_code_2(tmp_path):
    """Hydra's own configuration errors (a value of the wrong type, an unknown option or
    key, a bad override) exit 2 as featbench's checks do; 1 is kept for bugs."""
    for args, message in [
        (["seed=abc"], "full_key: seed"),
        (["model=nope"], "Could not find 'model/nope'"),
        (["unknownfield=1"], "Could not override 'unknownfield'"),
        (["layer=["], "no viable alternative"),
    ]:
        out = _run([*args, "hydra.mode=RUN", f"paths.results_dir={tmp_path}"], tmp_path, 120)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        assert message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_a_sweep_with_a_failed_job_exits_with_that_jobs_code(tmp_path):
    """The end-of-sweep callback's verdict (bench.errors.SweepFailed) is featbench's exit
    code: a sweep whose job failed on a configuration error exits 2, naming the job."""
    out = _run(
        [
            "-m",
            "experiment=smoke",
            "method=snmf",
            "method.rank=99999",
            "logger=none",
            f"paths.results_dir={tmp_path}",
        ],
        tmp_path,
        300,
    )
    printed = out.stdout + out.stderr  # Hydra's log lines go to stdout
    assert out.returncode == 2, printed[-2000:]
    assert "rank 99999 exceeds the mlp_post width" in printed
    assert "1 job(s) of the sweep failed" in printed and "Traceback" not in printed
    [failed] = list(tmp_path.rglob("failed.json"))
    assert json.loads(failed.read_text())["exit_code"] == 2
