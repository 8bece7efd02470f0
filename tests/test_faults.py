"""Faults a long sweep meets, caused for real: a full or read-only disk, two jobs
building one activation-cache entry at once, and SIGKILL while activations are
being cached or an SAE is training. Each ends in a clear error or in the same
results as an undisturbed run, and never in a corrupt file.

(Judge endpoints that time out, answer 500 or garbage: tests/test_judges_openai.py.
A sweep killed mid-steering: tests/test_sweeps.py.)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from bench.results import ResultsError, finalize, read_metrics, write_metrics
from tests.conftest import RUN, featbench_cmd

SMOKE = ["experiment=smoke", "task=[concept_detection]", "logger=none"]


# --- a full or read-only disk ----------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")],
)
def test_full_or_read_only_disk_is_a_clear_error_and_keeps_old_results(
    tmp_path, monkeypatch, code, words
):
    target = tmp_path / "metrics.parquet"
    old = finalize([{"metric": "old", "value": 1.0}], RUN)
    write_metrics(old, target)
    before = target.read_bytes()

    def fail_half_way(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")  # the disk fills up mid-write
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(pq, "write_table", fail_half_way)
    with pytest.raises(ResultsError, match=f"cannot write results to .*{words}"):
        write_metrics(finalize([{"metric": "new", "value": 2.0}], RUN), target)
    assert target.read_bytes() == before  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.parquet"]  # no temporary left


# --- jobs on real processes -----------------------------------------------------------


def _env(cache: Path) -> dict:
    return {**os.environ, "HYDRA_FULL_ERROR": "0", "FEATBENCH_CACHE": str(cache)}


@pytest.fixture()
def fresh_activations(tmp_path, embedded) -> Path:
    """A cache with the converted model (copied) but no activations."""
    source = Path(os.environ.get("FEATBENCH_CACHE") or Path.home() / ".cache" / "featbench")
    cache = tmp_path / "cache"
    shutil.copytree(source / "models", cache / "models")
    return cache


def _table(results: Path) -> pd.DataFrame:
    frames = [read_metrics(p)[0] for p in sorted(results.rglob("metrics.parquet"))]
    table = pd.concat(frames, ignore_index=True).drop(columns=["created_at", "code_version"])
    keys = ["method", "task", "metric", "feature", "concept"]
    return table.sort_values(keys, na_position="first", kind="stable").reset_index(drop=True)


def _run(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    out = subprocess.run(
        featbench_cmd() + args,
        cwd=cwd,
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out


def _kill_when(
    args: list[str],
    cwd: Path,
    cache: Path,
    ready,
    timeout: float = 600,
    command: list[str] | None = None,
) -> None:
    """Start featbench (or `command`), SIGKILL its process group as soon as `ready()` is
    true."""
    with open(cwd / "killed.log", "w") as log:
        proc = subprocess.Popen(
            (command or featbench_cmd()) + args,
            cwd=cwd,
            env=_env(cache),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                assert proc.poll() is None, f"finished (rc={proc.returncode}) before the kill"
                assert time.monotonic() < deadline, "the kill point never came"
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _entries(cache: Path) -> list[Path]:
    return sorted((cache / "activations").glob("*.safetensors"))


@pytest.mark.integration
def test_concurrent_jobs_build_one_cache_entry_once(tmp_path, fresh_activations):
    """joblib with 2 workers: both jobs need the same activations; one builds the
    entry under the lock, the other waits and reads it."""
    results = tmp_path / "results"
    args = [
        "-m",
        *SMOKE,
        "method=diffmean,random",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"paths.results_dir={results}",
    ]
    _run(args, tmp_path, fresh_activations)
    assert len(_entries(fresh_activations)) == 1
    logs = "".join(p.read_text() for p in results.rglob("featbench.log"))
    assert logs.count("activations at blocks.3.mlp.hook_post cached") == 1
    assert logs.count("cache hit") == 1
    assert len(list(results.rglob("metrics.parquet"))) == 2


@pytest.mark.integration
def test_two_identical_sweeps_started_together_compute_each_job_once(tmp_path, embedded):
    """The second sweep waits on the job's lock, then finds its results and skips it."""
    results = tmp_path / "results"
    args = ["-m", *SMOKE, "method=diffmean,random", f"paths.results_dir={results}"]
    cache = Path(os.environ["FEATBENCH_CACHE"])
    procs = [
        subprocess.Popen(
            featbench_cmd() + args,
            cwd=tmp_path,
            env=_env(cache),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    printed = [proc.communicate(timeout=900)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], printed
    both = "".join(printed)
    lines = both.splitlines()
    written = [line for line in lines if "metrics.parquet (" in line and " rows) in " in line]
    skipped = [line for line in lines if "already holds these results" in line]
    assert len(written) == 2 and len(skipped) == 2, both[-4000:]  # each job: computed once


# `featbench` with safetensors' file writer paused half-way: it writes the first half of
# the file's bytes, flushes them, and waits, so the kill lands while the activation cache
# entry's temporary file (bench/core/storage.atomic_write: `.<name>.*.tmp` beside the entry) is
# half-written, every time; it touches `paused` in its working folder once the half is
# flushed, since a poll that only watched the file's size saw it mid-write.
# (Unpaused, the write of the smoke entry's few MB takes
# milliseconds, and a kill timed by polling mostly lands before or after it.) The bytes,
# the file and the code path are the real ones; only the moment is held open.
HALF_WRITTEN = """
import sys, time
import safetensors.torch

def save_file(tensors, filename, metadata=None):
    data = safetensors.torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        open("paused", "w").close()  # in the test's cwd: the half is on disk, kill now
        time.sleep(600)  # killed here
        handle.write(data[len(data) // 2 :])

safetensors.torch.save_file = save_file  # before bench.activations.extraction imports it
from bench.cli.featbench import cli
sys.argv[0] = "featbench"
cli()
"""


@pytest.mark.integration
def test_kill_during_activation_caching_leaves_no_entry_and_the_rerun_matches(
    tmp_path, fresh_activations
):
    reference = tmp_path / "reference"
    _run([*SMOKE, "hydra.mode=RUN", f"hydra.run.dir={reference}"], tmp_path, fresh_activations)
    shutil.rmtree(fresh_activations / "activations")

    job = tmp_path / "job"
    args = [*SMOKE, "hydra.mode=RUN", f"hydra.run.dir={job}"]
    folder = fresh_activations / "activations"
    at_kill: dict[Path, int] = {}

    def half_written() -> bool:  # the writer paused, its temporary file holds the half
        if not (tmp_path / "paused").exists():  # still writing the half: its size moves
            return False
        for tmp in folder.glob(".*.safetensors.*.tmp") if folder.is_dir() else []:
            try:
                size = tmp.stat().st_size
            except FileNotFoundError:
                continue
            if size > 0:
                at_kill[tmp] = size
                return True
        return False

    _kill_when(
        args,
        tmp_path,
        fresh_activations,
        half_written,
        command=[sys.executable, "-c", HALF_WRITTEN],
    )
    [(tmp, size)] = at_kill.items()
    assert tmp.stat().st_size == size  # the kill left it as it was: half a file
    assert not _entries(fresh_activations)  # nothing half-written under the entry's name
    assert not (job / "metrics.parquet").exists()
    _run(args, tmp_path, fresh_activations)
    [entry] = _entries(fresh_activations)
    assert tmp.name.startswith(f".{entry.name}.")  # it was this entry's write
    assert 0 < size < entry.stat().st_size  # killed mid-write, not before, not after
    pd.testing.assert_frame_equal(_table(job), _table(reference))


@pytest.mark.integration
def test_kill_during_sae_training_then_the_sweep_rerun_matches(tmp_path, fresh_activations):
    sae = ["method=topk_sae", "method.epochs=300"]  # long enough to be killed mid-training
    reference = tmp_path / "reference"
    _run(["-m", *SMOKE, *sae, f"paths.results_dir={reference}"], tmp_path, fresh_activations)

    results = tmp_path / "results"
    args = ["-m", *SMOKE, *sae, f"paths.results_dir={results}"]

    def training() -> bool:
        logs = list(results.rglob("featbench.log"))
        return bool(logs) and "activations at" in logs[0].read_text()

    _kill_when(args, tmp_path, fresh_activations, training)
    job_logs = list(results.rglob("featbench.log"))
    assert "features fitted" not in job_logs[0].read_text()  # killed before the fit ended
    assert not list(results.rglob("metrics.parquet"))
    _run(args, tmp_path, fresh_activations)
    pd.testing.assert_frame_equal(_table(results), _table(reference))


# --- output that stops taking writes ----------------------------------------------------


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from tests.conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.integration
def test_a_job_folder_that_fills_up_after_the_fit_keeps_its_results(
    tmp_path, monkeypatch, embedded
):
    """A full disk in the job folder from the first steering checkpoint on (simulated:
    every later write there raises ENOSPC): the job finishes with its results in memory,
    the error names the folder and the reason, and the results land in the rescue folder,
    equal to an undisturbed run's."""
    import bench.results
    import bench.tasks.checkpoints
    from bench.job.run import rescue_dir, run_job

    cfg = _compose(
        ["experiment=smoke", "task=[concept_detection,steering]", "logger=none", "hydra.mode=RUN"]
    )
    undisturbed = run_job(cfg, tmp_path / "undisturbed")
    full = tmp_path / "full"

    def refusing(writer):
        def write(path, *args, **kwargs):
            if Path(path).is_relative_to(full):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return writer(path, *args, **kwargs)

        return write

    monkeypatch.setattr(
        bench.tasks.checkpoints,
        "atomic_write_text",
        refusing(bench.tasks.checkpoints.atomic_write_text),
    )
    monkeypatch.setattr(bench.results, "atomic_write", refusing(bench.results.atomic_write))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with pytest.raises(ResultsError) as info:
        run_job(cfg, full)
    message = str(info.value)
    rescue = rescue_dir(full, undisturbed["config_hash"].iloc[0])
    assert str(full) in message and "No space left on device" in message
    assert str(rescue) in message and rescue.is_relative_to(tmp_path / "tmp")
    assert not (full / "metrics.parquet").exists()
    saved, _ = read_metrics(rescue / "metrics.parquet")
    expected, _ = read_metrics(tmp_path / "undisturbed" / "metrics.parquet")
    columns = [c for c in expected.columns if c != "created_at"]
    pd.testing.assert_frame_equal(saved[columns], expected[columns])


def test_a_results_folder_that_takes_no_folder_is_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the results folder should be")
    for mode in ("RUN", "MULTIRUN"):
        out = subprocess.run(
            featbench_cmd()
            + [
                "experiment=smoke",
                f"paths.results_dir={blocker}/results",
                f"hydra.mode={mode}",
                "logger=none",
            ],
            cwd=tmp_path,
            env=_env(tmp_path / "cache"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 2, (mode, (out.stdout + out.stderr)[-3000:])
        assert "Traceback" not in out.stderr and f"cannot write {blocker}" in out.stderr, mode


SABOTAGE = """
import shutil
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from featbench.tasks.base import Task


@dataclass
class Sabotage(Task):
    name = "sabotage"

    def evaluate(self, model, features, data, cfg):
        # as a hostile user would: the job's folder stops taking writes after the fit (here
        # it becomes a file, which even root cannot write into)
        job = Path(HydraConfig.get().runtime.output_dir)
        shutil.move(str(job), str(job.parent / "moved-aside"))
        job.write_text("not a folder any more")
        return [{"metric": "sabotaged", "value": 1.0}]
"""


@pytest.mark.integration
def test_a_job_whose_folder_stops_taking_writes_fails_the_sweep_naming_its_rescue(
    tmp_path, embedded
):
    """Issue 25: the results were rescued to a temporary folder, failed.json could not be
    written, and the sweep exited 0. A job whose results did not land where asked is a
    failed job: the sweep exits non-zero and names the job and where its results are."""
    plugins = tmp_path / "plugins" / "hostile_tasks"
    plugins.mkdir(parents=True)
    (plugins / "__init__.py").write_text(SABOTAGE)
    (tmp_path / "tmp").mkdir()
    env = {
        **_env(Path(os.environ.get("FEATBENCH_CACHE") or Path.home() / ".cache/featbench")),
        "PYTHONPATH": str(plugins.parent),
        "TMPDIR": str(tmp_path / "tmp"),
    }
    out = subprocess.run(
        featbench_cmd()
        + [
            "-m",
            "experiment=smoke",
            "method=random",
            "task=[concept_detection]",
            "+task.sabotage._target_=hostile_tasks.Sabotage",
            "logger=none",
            f"paths.results_dir={tmp_path / 'results'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    printed = out.stdout + out.stderr
    assert out.returncode == 2, printed[-3000:]
    [rescued] = list((tmp_path / "tmp" / "featbench-rescued").glob("*/metrics.parquet"))
    assert read_metrics(rescued)[0]["metric"].eq("sabotaged").any()
    assert "failed job" in printed and "method=random" in printed and str(rescued.parent) in printed
    assert json.loads((rescued.parent / "failed.json").read_text())["exit_code"] == 2


# --- a judge whose judgements mostly failed ------------------------------------------------


def _judged(failed: float, judged: int) -> pd.DataFrame:
    rows = [
        {"metric": "judge_failures", "value": failed, "n": judged},
        {"metric": "heldout_steering_score", "value": 0.5, "n": 8},
    ]
    return finalize(rows, RUN)


def test_too_many_judge_failures_mark_the_job_failed_and_a_rerun_runs_it(tmp_path):
    """Issue 18: a job whose judgements failed beyond `judge_failure_limit` never looks like
    a success: failed.json says why (the end-of-sweep callback exits non-zero on it), the
    job raises a one-line error (exit 2), and its results, written first, are kept but not
    taken as done by a rerun."""
    from bench.errors import JudgeFailures
    from bench.job.checks import check_judge_failures, completed

    check_judge_failures(_judged(1, 10), 0.1, tmp_path)  # 10%: at the limit, allowed
    assert not (tmp_path / "failed.json").exists()
    frame = _judged(72, 224)  # the share of a 135M judge's failures in a paper run
    write_metrics(frame, tmp_path / "metrics.parquet", {})
    assert completed(tmp_path, RUN["config_hash"], RUN["code_digest"]) is not None
    with pytest.raises(
        JudgeFailures,
        match=r"72 of 224 judgements failed \(32%\), more than "
        r"judge_failure_limit=0.1",
    ):
        check_judge_failures(frame, 0.1, tmp_path)
    record = json.loads((tmp_path / "failed.json").read_text())
    assert record["exit_code"] == 2 and record["judge_failures"] == 72
    assert record["judgements"] == 224 and "judge_failure_limit" in record["error"]
    assert (
        completed(tmp_path, RUN["config_hash"], RUN["code_digest"]) is None
    )  # results kept, not "done"
    check_judge_failures(frame, 0.5, tmp_path)  # a limit raised knowingly lets it pass
