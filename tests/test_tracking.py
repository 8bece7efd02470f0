"""The W&B side channel (bench/tracking.py), in W&B's offline mode.

Runs are read back from the `.wandb` transaction log with W&B's own protobuf
`Record` messages. wandb 0.31 no longer ships a Python reader for the file's
framing (the leveldb log format: 7-byte ":W&B" header, 32 KiB blocks, records
with a crc32/length/type header), so `_records` below reads it.
"""

from __future__ import annotations

import json
import logging
import struct
import sys
import time
import zlib
from pathlib import Path

import pandas as pd
import pytest

from bench.errors import ConfigError
from bench.results import finalize
from bench.secrets import REDACTED
from bench.tracking import WandbLogger, summary_metrics, table_rows

SECRET = "sk-FAKE-SECRET-123"
ARGV_SECRET = "sk-ARGV-SECRET-456"
ENV_SECRET = "wandb-env-secret-789"
RUN = {
    "run_id": "r0",
    "model": "smollm2-135m",
    "layer": 3,
    "hook": "mlp_post",
    "method": "snmf",
    "task": "concept_detection",
    "seed": 42,
    "config_hash": "abc123",
    "setting_hash": "def456",
    "code_version": "featbench test",
    "dataset_hash": "d0",
    "dataset_version": "concepts-v2",
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
        "method": {"_target_": "methods.snmf.SNMF", "k": 8},
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
        "featbench", "sweep-1", "snmf-seed42", "featbench",
    )  # fmt: skip
    assert list(run.tags) == ["unit"]
    assert got["config"]["judge"] == {"api_key": REDACTED, "model": "gpt-4o-mini"}
    assert got["config"]["method"] == {"_target_": "methods.snmf.SNMF", "k": 8}
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


def test_finish_and_log_without_start_do_nothing(wandb_env):
    tracker = WandbLogger()
    tracker.log_results(_frame(), [])
    tracker.finish(failed=False)
    tracker.finish(failed=True)


def test_start_failure_is_a_warning_and_later_calls_do_nothing(
    wandb_env, tmp_path, monkeypatch, caplog
):
    import wandb

    def broken(**kwargs):
        raise RuntimeError("service did not start")

    monkeypatch.setattr(wandb, "init", broken)
    tracker = WandbLogger()
    with caplog.at_level(logging.WARNING, logger="bench.tracking"):
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
        "offline", "featbench", None, [],
    )  # fmt: skip


def test_summary_metrics_and_table_rows_are_plain_and_capped(monkeypatch, caplog):
    summary, missing = summary_metrics(_frame())
    assert missing == 1
    assert all(isinstance(v, float) for v in summary.values())
    assert summary_metrics(finalize([], RUN)) == ({}, 0)

    monkeypatch.setattr("bench.tracking.MAX_TABLE_ROWS", 3)
    with caplog.at_level(logging.WARNING, logger="bench.tracking"):
        columns, rows = table_rows(_frame(), "features")
    assert len(rows) == 3 and "first 3 of 6 rows" in caplog.text
    for row in rows:
        assert all(v is None or type(v) in (str, int, float, bool) for v in row)
    assert rows[1][columns.index("value")] is None  # the missing value stays missing
