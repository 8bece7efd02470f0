"""Sweeps that survive faults, run for real: a sweep killed with SIGKILL in the
middle of a job's steering task, then started again, ends with the same table
as a sweep that was never interrupted; finished jobs are skipped, `force=true`
reruns them; submitit's local executor gives the basic launcher's table.

Every sweep here is `experiment=smoke` over two methods on the embedded model
(about 15 s a job with a warm cache).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from bench.results import read_metrics
from tests.conftest import featbench_cmd, wait_for

pytestmark = pytest.mark.integration

SWEEP = ["-m", "experiment=smoke", "method=diffmean,random", "logger=none"]
# Columns that may differ between two runs: the time, and the commit when the tree
# changes between them (a developer committing while the test runs).
VOLATILE = ["created_at", "code_version"]


def _env() -> dict:
    return {**os.environ, "HYDRA_FULL_ERROR": "0"}


def _sweep(results: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    args = featbench_cmd() + SWEEP + [f"paths.results_dir={results}", *extra]
    return subprocess.run(
        args, cwd=results.parent, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _table(results: Path) -> pd.DataFrame:
    """Every job's metrics, in a canonical row order, without volatile columns."""
    frames = []
    for path in sorted(results.rglob("metrics.parquet")):
        frame, _ = read_metrics(path)
        frames.append(frame.drop(columns=VOLATILE))
    table = pd.concat(frames, ignore_index=True)
    keys = ["method", "task", "metric", "feature", "concept", "kl_target", "sign"]
    keys += [c for c in ("sample", "generator", "noise") if c in table]
    return table.sort_values(keys, na_position="first", kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, embedded) -> pd.DataFrame:
    results = tmp_path_factory.mktemp("uninterrupted") / "results"
    out = _sweep(results)
    assert out.returncode == 0, out.stderr[-3000:]
    return _table(results)


def test_killed_sweep_resumes_and_matches_an_uninterrupted_one(tmp_path, uninterrupted):
    results = tmp_path / "results"
    args = featbench_cmd() + SWEEP + [f"paths.results_dir={results}"]
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        # The second job (random) has finished its first steered feature: kill the
        # whole process group mid-task, as the OOM killer or a cluster would.
        checkpoint = wait_for(
            "*method=random/checkpoints/steering-*/*_*.json", results, proc, timeout=600
        )
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    job = checkpoint.parents[2]
    assert not (job / "metrics.parquet").exists()
    assert not list(results.rglob(".metrics.parquet.*"))  # no partial parquet left behind
    [finished] = list(results.rglob("metrics.parquet"))  # the first job's, intact
    assert "method=diffmean" in str(finished) and len(read_metrics(finished)[0]) > 0

    again = _sweep(results)
    printed = again.stdout + again.stderr
    assert again.returncode == 0, printed[-3000:]
    assert "skipped:" in printed and "method=diffmean" in printed  # the finished job
    assert "resumed from" in printed  # the killed job's first feature
    assert not (job / "checkpoints").exists()  # removed once the results were written
    pd.testing.assert_frame_equal(_table(results), uninterrupted)


def test_force_reruns_finished_jobs(tmp_path, uninterrupted):
    results = tmp_path / "results"
    first = _sweep(results, "task=[concept_detection]")
    assert first.returncode == 0, first.stderr[-3000:]
    stamps = {p: read_metrics(p)[0]["created_at"].iloc[0] for p in results.rglob("metrics.parquet")}
    again = _sweep(results, "task=[concept_detection]")
    assert (
        again.returncode == 0
        and (again.stdout + again.stderr).count("already holds these results") == 2
    )
    forced = _sweep(results, "task=[concept_detection]", "force=true")
    assert forced.returncode == 0 and "already holds" not in forced.stdout + forced.stderr
    for path, stamp in stamps.items():  # same folders, rewritten
        assert read_metrics(path)[0]["created_at"].iloc[0] > stamp


def test_submitit_local_launcher_gives_the_basic_launchers_table(tmp_path, embedded):
    basic = _sweep(tmp_path / "basic", "task=[concept_detection,reconstruction]")
    assert basic.returncode == 0, basic.stderr[-3000:]
    local = _sweep(
        tmp_path / "submitit",
        "task=[concept_detection,reconstruction]",
        "hydra/launcher=submitit_local",
    )
    assert local.returncode == 0, local.stderr[-3000:]
    assert list((tmp_path / "submitit").rglob(".submitit"))  # it did go through submitit
    pd.testing.assert_frame_equal(_table(tmp_path / "submitit"), _table(tmp_path / "basic"))
