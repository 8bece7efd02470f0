"""The W&B side channel (bench/job/tracking.py), in W&B's offline mode.

Runs are read back from the `.wandb` transaction log with W&B's own protobuf
`Record` messages. wandb 0.31 no longer ships a Python reader for the file's
framing (the leveldb log format: 7-byte ":W&B" header, 32 KiB blocks, records
with a crc32/length/type header), so `_records` below reads it.

A job killed mid-run is a real process killed with SIGKILL; `featbench-wandb-sync`
then runs the real `wandb sync --dry-run`, which needs no network.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pandas as pd
import pytest

from bench.cli.wandb_sync import cli as sync_cli
from bench.cli.wandb_sync import offline_runs
from bench.core.secrets import REDACTED
from bench.errors import ConfigError
from bench.job.tracking import FINISHED_MARKER, WandbLogger, summary_metrics, table_rows
from bench.results import finalize
from tests import conftest

SECRET = "sk-FAKE-SECRET-123"
ARGV_SECRET = "sk-ARGV-SECRET-456"
ENV_SECRET = "wandb-env-secret-789"
RUN = {
    **conftest.RUN,
    "model": "smollm2-135m",
    "hook": "mlp_post",
    "method": "snmf",
    "task": "concept_detection",
}


@pytest.fixture(scope="session")
def wandb_home(tmp_path_factory) -> Path:
    """One folder for W&B's own files in this session: its service process starts
    once per Python process and keeps the directories it started with."""
    return tmp_path_factory.mktemp("wandb-home")


@pytest.fixture()
def wandb_env(monkeypatch, tmp_path, wandb_home) -> Path:
    """W&B writes nothing outside temporary folders and finds no credentials."""
    for var in ("DIR", "CACHE_DIR", "CONFIG_DIR", "DATA_DIR", "ARTIFACT_DIR"):
        monkeypatch.setenv(f"WANDB_{var}", str(wandb_home / var.lower()))
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # restored after the test
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))  # absent
    return wandb_home


def _records(wandb_file: Path) -> list:
    """Every record of a `.wandb` transaction log, parsed with W&B's protobuf."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = wandb_file.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (crc, length, kind) == (0, 0, 0):  # zero-filled block tail
            pos += block - pos % block
            continue
        if pos + 7 + length > len(data):  # a record still being written
            break
        body = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + body) == crc, f"bad checksum at byte {pos}"
        pos += 7 + length
        if kind == 1:  # FULL
            out.append(body)
        elif kind == 2:  # FIRST
            pending = body
        elif kind == 3:  # MIDDLE
            pending += body
        elif kind == 4:  # LAST
            out.append(pending + body)
    records = []
    for raw in out:
        record = Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def _read_run(run_dir: Path, timeout: float = 30.0) -> dict:
    """The run, config, flat summary, exit code and record kinds of one offline run.

    `run.finish()` returns once W&B's service has the exit record; the service
    writes the file's last buffered records just after, so this waits for them.
    """
    (wandb_file,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = _records(wandb_file)
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    summary: dict = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            for u in record.summary.update:
                key = u.key or "/".join(u.nested_key)
                summary[key] = json.loads(u.value_json)
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    return {"run": run, "config": config, "summary": summary, "exits": exits, "kinds": kinds}


def _offline_runs(root: Path) -> list[Path]:
    return sorted((root / "wandb").glob("offline-run-*"))


def _frame() -> pd.DataFrame:
    rows = [
        {"metric": "mean_feature_auroc", "value": 0.8, "ci_low": 0.7, "ci_high": 0.9},
        {"metric": "dead_features", "value": None, "reason": "no activations"},
        {"metric": "steering_score", "value": 1.25, "kl_target": 0.5, "sign": 1},
        {"concept": "animals", "metric": "concept_best_auroc", "value": 0.95},
        {"feature": 0, "concept": "animals", "metric": "auroc", "value": 0.9, "text": "a cat"},
        {"feature": 1, "concept": "food", "metric": "auroc", "value": float("nan")},
    ]
    return finalize(rows, RUN)


def _plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1), dpi=20)
    ax.plot([0, 1], [1, 0])
    fig.savefig(path)
    plt.close(fig)
    return path


def test_offline_run_mirrors_config_summary_tables_plots_and_no_secrets(
    wandb_env, tmp_path, monkeypatch
):
    monkeypatch.setattr(sys, "argv", ["featbench", f"judge.api_key={ARGV_SECRET}"])
    monkeypatch.setenv("WANDB_API_KEY", ENV_SECRET)  # offline mode must neither need nor log it
    config = {
        "judge": {"api_key": SECRET, "model": "gpt-4o-mini"},
        "method": {"_target_": "featbench.methods.snmf.SNMF", "k": 8},
        "seed": 42,
    }
    job_dir = tmp_path / "job"
    tracker = WandbLogger(tags=["unit"])
    tracker.start(config, job_dir, group="sweep-1", name="snmf-seed42")
    tracker.log_results(_frame(), [_plot(tmp_path / "auroc_curve.png")])
    tracker.finish(failed=False)

    (run_dir,) = _offline_runs(job_dir)
    got = _read_run(run_dir)
    run = got["run"]
    assert (run.project, run.run_group, run.display_name, run.job_type) == (
        "featbench",
        "sweep-1",
        "snmf-seed42",
        "featbench",
    )
    assert list(run.tags) == ["unit"]
    assert got["config"]["judge"] == {"api_key": REDACTED, "model": "gpt-4o-mini"}
    assert got["config"]["method"] == {"_target_": "featbench.methods.snmf.SNMF", "k": 8}
    assert got["config"]["seed"] == 42

    summary = got["summary"]
    assert summary["concept_detection/mean_feature_auroc"] == 0.8
    assert summary["concept_detection/mean_feature_auroc/ci_low"] == 0.7
    assert summary["concept_detection/mean_feature_auroc/ci_high"] == 0.9
    assert summary["concept_detection/steering_score[kl_target=0.5,sign=1]"] == 1.25
    assert "concept_detection/dead_features" not in summary
    assert summary["featbench/missing_summary_values"] == 1
    assert summary["featbench/rows"] == 6
    assert summary["features/nrows"] == 2
    assert summary["concepts/nrows"] == 1
    assert got["exits"] == [0]
    assert "environment" not in got["kinds"]  # W&B's metadata record (holds sys.argv)

    (table_file,) = (run_dir / "files" / "media" / "table").glob("features_*.table.json")
    table = json.loads(table_file.read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(r["feature"], r["concept"], r["value"]) for r in rows] == [
        (0, "animals", 0.9),
        (1, "food", None),
    ]
    assert rows[0]["text"] == "a cat" and rows[0]["task"] == "concept_detection"
    assert list((run_dir / "files" / "media" / "images" / "plots").glob("auroc_curve_*.png"))

    for root in (tmp_path, wandb_env):
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                for secret in (SECRET, ARGV_SECRET, ENV_SECRET):
                    assert secret.encode() not in data, f"{secret} leaked into {path}"


def test_failed_job_exits_1_and_runs_stay_separate_in_one_process(wandb_env, tmp_path):
    """Hydra multirun runs jobs in one process: each job gets its own W&B run."""
    first, second = tmp_path / "job0", tmp_path / "job1"
    tracker = WandbLogger()
    tracker.start({"method": {"k": 1}}, first, group="sweep", name="job0")
    tracker.log_results(_frame(), [])
    tracker.finish(failed=False)
    tracker.start({"method": {"k": 2}}, second, group="sweep", name="job1")
    tracker.finish(failed=True)
    tracker.finish(failed=True)  # idempotent
    tracker.finish(failed=False)

    (run0,) = _offline_runs(first)
    (run1,) = _offline_runs(second)
    got0, got1 = _read_run(run0), _read_run(run1)
    assert got0["exits"] == [0] and got1["exits"] == [1]
    assert got0["config"]["method"] == {"k": 1} and got1["config"]["method"] == {"k": 2}
    assert got0["run"].run_id != got1["run"].run_id
    assert "concept_detection/mean_feature_auroc" not in got1["summary"]
    # both closed by featbench, so both marked finished, each with its exit code
    marks = [json.loads((run / FINISHED_MARKER).read_text()) for run in (run0, run1)]
    assert [(m["run_id"], m["exit_code"]) for m in marks] == [
        (got0["run"].run_id, 0),
        (got1["run"].run_id, 1),
    ]


def test_error_reporting_is_off_for_wandbs_calls_only(wandb_env, tmp_path, monkeypatch):
    """Offline runs switch W&B's error reporting off while W&B is called (its service
    reads the variable when it starts, inside wandb.init) and leave the process's
    environment as they found it: unset stays unset, a user's own value stays."""
    import wandb

    monkeypatch.delenv("WANDB_ERROR_REPORTING", raising=False)
    seen = []
    real_init = wandb.init

    def init(**kwargs):
        seen.append(os.environ.get("WANDB_ERROR_REPORTING"))
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    before = dict(os.environ)
    tracker = WandbLogger()
    tracker.start({"seed": 1}, tmp_path / "job0", group="g", name="job0")
    tracker.log_results(_frame(), [])
    tracker.finish(failed=False)
    after = dict(os.environ)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert seen == ["false"]
    # WANDB_SERVICE: W&B's own, the address of its service for child processes (set by
    # the first run of the process, which may have been an earlier test's)
    assert changed <= {"WANDB_SERVICE"}, changed

    monkeypatch.setenv("WANDB_ERROR_REPORTING", "true")
    tracker.start({"seed": 2}, tmp_path / "job1", group="g", name="job1")
    tracker.finish(failed=True)
    assert seen == ["false", "false"] and os.environ["WANDB_ERROR_REPORTING"] == "true"


# A job killed mid-run, for real: one job's run finished, the next one's open when the
# process gets SIGKILL (as from the OOM killer or a cluster's time limit).
KILLED_JOB = """
import os, signal, sys
from pathlib import Path
from bench.job.tracking import WandbLogger
done = WandbLogger()
done.start({"seed": 1}, Path(sys.argv[1]), group="sweep", name="done")
done.finish(failed=False)
killed = WandbLogger()
killed.start({"seed": 2}, Path(sys.argv[2]), group="sweep", name="killed")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_jobs_partial_run_is_never_synced(wandb_env, tmp_path, capfd):
    done_dir, killed_dir = tmp_path / "sweep" / "done", tmp_path / "sweep" / "killed"
    out = subprocess.run(
        [sys.executable, "-c", KILLED_JOB, str(done_dir), str(killed_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    (done,), (killed,) = _offline_runs(done_dir), _offline_runs(killed_dir)
    assert "exit" in _read_run(done)["kinds"]
    (killed_log,) = killed.glob("run-*.wandb")
    assert "exit" not in [r.WhichOneof("record_type") for r in _records(killed_log)]
    assert offline_runs(tmp_path) == ([done], [killed])
    assert not (killed / FINISHED_MARKER).exists()

    # The old recipe, `wandb sync <job>/wandb/offline-run-*`, would upload the partial run:
    plain = subprocess.run(
        [sys.executable, "-m", "wandb", "sync", "--dry-run", str(killed)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Would sync 1 run(s)" in plain.stdout + plain.stderr

    sync_cli([str(tmp_path), "--list"])
    assert capfd.readouterr().out == f"finished {done}\npartial {killed}\n"
    with pytest.raises(SystemExit) as exited:  # the real `wandb sync`, as a dry run
        sync_cli([str(tmp_path), "--", "--dry-run"])
    assert exited.value.code == 0
    printed = capfd.readouterr()
    wandb_lines = [
        line for line in (printed.out + printed.err).splitlines() if line.startswith("wandb:")
    ]
    assert "wandb: Would sync 1 run(s):" in wandb_lines
    assert any(str(done) in line for line in wandb_lines)
    assert not any(str(killed) in line for line in wandb_lines)


def test_sync_refuses_a_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        sync_cli([str(tmp_path / "nowhere")])
    assert exited.value.code == 2 and "no such folder" in capsys.readouterr().err


def test_finish_and_log_without_start_do_nothing(wandb_env, tmp_path, monkeypatch, caplog):
    """Issue 25: this used to assert nothing while the code under it swallowed every error.
    Without a started run, nothing reaches W&B: every entry point of it is recorded."""
    import wandb

    import bench.job.tracking as tracking

    calls = []

    def record(name):
        return lambda *args, **kwargs: calls.append(name)

    monkeypatch.setattr(wandb, "init", record("init"))
    monkeypatch.setattr(wandb, "Table", record("Table"))
    monkeypatch.setattr(wandb, "Image", record("Image"))
    monkeypatch.setattr(tracking, "summary_metrics", record("summary_metrics"))
    tracker = WandbLogger()
    with caplog.at_level(logging.DEBUG, logger="bench.job.tracking"):
        tracker.log_results(_frame(), [_plot(tmp_path / "plot.png")])
        tracker.finish(failed=False)
        tracker.finish(failed=True)
    assert calls == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "no W&B run open" in caplog.text
    assert not list(tmp_path.rglob(tracking.FINISHED_MARKER))


def test_start_failure_is_a_warning_and_later_calls_do_nothing(
    wandb_env, tmp_path, monkeypatch, caplog
):
    import wandb

    def broken(**kwargs):
        raise RuntimeError("service did not start")

    monkeypatch.setattr(wandb, "init", broken)
    tracker = WandbLogger()
    with caplog.at_level(logging.WARNING, logger="bench.job.tracking"):
        tracker.start({"seed": 1}, tmp_path / "job", group="g", name="n")
    assert "service did not start" in caplog.text
    tracker.log_results(_frame(), [])
    tracker.finish(failed=True)


@pytest.mark.parametrize("mode", ["dryrun", "Offline", "", "run"])
def test_bad_mode_is_a_config_error(mode):
    with pytest.raises(ConfigError, match="offline, online, disabled") as err:
        WandbLogger(mode=mode)
    assert repr(mode) in str(err.value)


def test_online_without_credentials_is_a_config_error_before_wandb(wandb_env, monkeypatch):
    import wandb

    def no_network(**kwargs):
        raise AssertionError("wandb.init must not be reached")

    monkeypatch.setattr(wandb, "init", no_network)
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        WandbLogger(mode="online")


def test_online_with_a_netrc_login_passes_the_check(wandb_env, tmp_path, monkeypatch):
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert WandbLogger(mode="online").mode == "online"


def test_config_file_instantiates_an_offline_logger():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/logger/wandb.yaml")
    tracker = instantiate(cfg)
    assert isinstance(tracker, WandbLogger)
    assert (tracker.mode, tracker.project, tracker.entity, tracker.tags) == (
        "offline",
        "featbench",
        None,
        [],
    )


def test_summary_metrics_and_table_rows_are_plain_and_capped(monkeypatch, caplog):
    summary, missing = summary_metrics(_frame())
    assert missing == 1
    assert all(isinstance(v, float) for v in summary.values())
    assert summary_metrics(finalize([], RUN)) == ({}, 0)

    monkeypatch.setattr("bench.job.tracking.MAX_TABLE_ROWS", 3)
    with caplog.at_level(logging.WARNING, logger="bench.job.tracking"):
        columns, rows = table_rows(_frame(), "features")
    assert len(rows) == 3 and "first 3 of 6 rows" in caplog.text
    for row in rows:
        assert all(v is None or type(v) in (str, int, float, bool) for v in row)
    assert rows[1][columns.index("value")] is None  # the missing value stays missing


def test_summary_keys_carry_every_dimension_of_their_rows(caplog):
    """Issue 25: the native and projection encoders (and the two steering protocols) used to
    collapse into one W&B key, the second logged as "appears twice" and dropped."""
    rows = [
        {"metric": "mean_feature_auroc", "value": 0.8, "encoder": "native"},
        {"metric": "mean_feature_auroc", "value": 0.7, "encoder": "projection"},
    ]
    steering = [
        {"metric": "heldout_steering_score", "value": 0.5, "protocol": "concept"},
        {"metric": "heldout_steering_score", "value": 0.4, "protocol": "feature"},
    ]
    frame = pd.concat(
        [
            finalize(rows, {**RUN, "task": "concept_detection"}),
            finalize(steering, {**RUN, "task": "steering"}),
        ]
    )
    with caplog.at_level(logging.WARNING, logger="bench.job.tracking"):
        summary, _ = summary_metrics(frame)
    assert summary["concept_detection/mean_feature_auroc[encoder=native]"] == 0.8
    assert summary["concept_detection/mean_feature_auroc[encoder=projection]"] == 0.7
    assert summary["steering/heldout_steering_score[protocol=concept]"] == 0.5
    assert summary["steering/heldout_steering_score[protocol=feature]"] == 0.4
    assert "appears twice" not in caplog.text


def test_a_plot_that_cannot_be_drawn_never_fails_the_job(tmp_path, monkeypatch, caplog):
    """Issue 25: plotting ran unguarded inside the W&B path, so a plotting bug failed a job
    whose results were already written. The tracker still gets the results, and closes."""
    import bench.report
    from bench.job.run import mirror

    class Recorder:
        def __init__(self):
            self.calls = []

        def log_results(self, frame, plots):
            self.calls.append(("log_results", len(frame), list(plots)))

        def finish(self, failed):
            self.calls.append(("finish", failed))

    def boom(*args, **kwargs):
        raise ValueError("a plotting bug")

    monkeypatch.setattr(bench.report, "plot_job", boom)
    tracker = Recorder()
    with caplog.at_level(logging.WARNING, logger="bench.job.run"):
        mirror(tracker, _frame(), tmp_path, {})
    assert tracker.calls == [("log_results", len(_frame()), []), ("finish", False)]
    assert "ValueError: a plotting bug" in caplog.text
