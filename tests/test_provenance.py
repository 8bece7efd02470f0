"""Provenance: settings, code versions and the bootstrap replicates beside the metrics.

Fast unit tests: the composed config is real (Hydra), no model is loaded.
"""

from __future__ import annotations

import logging
import subprocess

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from bench import results
from bench.errors import ConfigError
from bench.job.checks import completed
from bench.job.identity import job_identity
from bench.results import (
    code_version,
    finalize,
    pop_replicates,
    read_replicates,
    uncommitted,
    write_metrics,
    write_replicates,
)
from tests import conftest

RUN = {**conftest.RUN, "code_version": "featbench 0.1.0+gold"}  # named in the log check


def _cfg(*overrides: str):
    with initialize_config_module(config_module="bench.conf", version_base="1.3"):
        return compose("config", overrides=["hydra.mode=RUN", *overrides])


def test_seeds_share_a_setting_and_other_values_do_not():
    a = job_identity(_cfg("method=snmf", "seed=1"))
    b = job_identity(_cfg("method=snmf", "seed=2"))
    c = job_identity(_cfg("method=snmf", "seed=1", "method.rank=50"))
    assert a.config_hash != b.config_hash  # the seed is part of what a job computes
    assert a.setting_hash == b.setting_hash  # ... but not of its setting
    assert a.setting_hash != c.setting_hash
    # The run's seed is the config's only seed: the method gets it from the job, not YAML.
    assert "seed" not in a.setting and "method.seed" not in a.setting
    assert a.setting["method.rank"] == 100 and c.setting["method.rank"] == 50
    assert not any(k.split(".")[0] in ("paths", "logger", "force") for k in a.setting)


def test_the_method_gets_the_runs_seed_from_the_job_and_nowhere_else():
    from featbench.methods.snmf import SNMF

    assert SNMF().seeded(7).seed == 7 and SNMF(rank=5).seeded(7).rank == 5
    with pytest.raises(ConfigError, match=r"interpolate the run's seed \(\$\{seed\}\)"):
        job_identity(_cfg("method=snmf", "+method.seed=${seed}"))
    with pytest.raises(ConfigError, match="interpolate the run's seed"):
        job_identity(
            _cfg(
                "method=snmf", "task=[synthetic_recovery]", "+task.synthetic_recovery.seed=${seed}"
            )
        )


def test_device_auto_is_resolved_before_hashing():
    auto = job_identity(_cfg("method=snmf", "device=auto"))
    cpu = job_identity(_cfg("method=snmf", "device=cpu"))
    assert auto.config["device"] == "cpu" and auto.config["method"]["device"] == "cpu"
    assert auto.config_hash == cpu.config_hash  # the same device used: the same results


def test_code_version_names_the_package_and_commit():
    version = code_version()
    assert version.startswith("featbench ")
    if "+g" in version:  # run from a checkout: the commit, and a digest when it is dirty
        commit = version.split("+g", 1)[1]
        assert len(commit.split(".", 1)[0]) == 12


def test_uncommitted_changes_count_over_the_whole_tree_but_not_the_results(tmp_path):
    """A checkout's new method file counts wherever it is asked from (the package folder is
    not the top); a sweep's rewrite of a committed results folder does not."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    (repo / "results" / "sweep").mkdir(parents=True)
    (repo / "bench" / "x.py").write_text("x = 1\n")
    (repo / "results" / "sweep" / "multirun.yaml").write_text("task: [a]\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], cwd=repo, check=True)
    inside = repo / "bench"
    assert uncommitted(inside) is None
    (repo / "results" / "sweep" / "multirun.yaml").write_text("task: [b]\n")
    (repo / "results" / "sweep" / "job").mkdir()
    (repo / "results" / "sweep" / "job" / "metrics.parquet").write_bytes(b"rows")
    assert uncommitted(inside) is None
    (repo / "methods").mkdir()
    (repo / "methods" / "new.py").write_text("y = 2\n")  # outside bench/, untracked
    added = uncommitted(inside)
    assert added is not None
    (repo / "bench" / "x.py").write_text("x = 3\n")
    assert uncommitted(inside) not in (None, added)


def test_results_of_other_code_are_run_again_and_the_log_says_why(tmp_path, caplog):
    job = tmp_path / "job"
    frame = finalize([{"metric": "a", "value": 1.0}], RUN)
    write_metrics(frame, job / "metrics.parquet")
    assert completed(job, "abc", "digest0") is not None  # same code identity: skipped
    with caplog.at_level(logging.INFO, logger="bench.job.checks"):
        assert completed(job, "abc", "digest1") is None
    assert (
        "results from code digest0 (featbench 0.1.0+gold); the code that computes " in caplog.text
    )
    assert "is now digest1, so the job runs again" in caplog.text
    assert completed(job, "other", "digest0") is None  # another config
    older = finalize([{"metric": "a", "value": 1.0}], RUN).drop(columns=["code_digest"])
    write_metrics(older, job / "metrics.parquet")  # results from before code digests
    assert completed(job, "abc", "digest0") is None


def test_the_code_digest_covers_what_computes_and_nothing_else():
    """Each digested file belongs to one package; the report and the docs are not in it."""
    digest = results.code_digest()
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert results.code_digest() == digest  # once per process


def test_replicates_leave_the_rows_and_come_back_by_id(tmp_path):
    rows = [
        {"metric": "m1", "value": 0.5, "replicates": np.array([0.4, 0.5, 0.6])},
        {"metric": "m2", "value": 1.0, "replicates": None},
        {"metric": "m3", "value": 2.0},
        {"metric": "m4", "value": 0.1, "replicates": [0.0, 0.2]},
    ]
    found = pop_replicates(rows, "task")
    assert sorted(found) == ["task:0", "task:1"]
    assert [r.get("replicates_id") for r in rows] == ["task:0", None, None, "task:1"]
    assert all("replicates" not in r for r in rows)
    frame = finalize(rows, RUN)
    assert frame["replicates_id"].tolist()[0] == "task:0"
    write_replicates(tmp_path / results.REPLICATES_FILE, found)
    back = read_replicates(tmp_path)
    np.testing.assert_array_equal(back["task:0"], [0.4, 0.5, 0.6])
    np.testing.assert_array_equal(back["task:1"], [0.0, 0.2])
    assert write_replicates(tmp_path / "none.parquet", {}) is None
    assert read_replicates(tmp_path / "absent") == {}


@pytest.mark.parametrize("bad", [{"metric": "a", "value": 1.0, "code_version": "x"}])
def test_rows_cannot_claim_run_provenance(bad):
    with pytest.raises(ValueError, match="run-level columns"):
        finalize([bad], RUN)


def test_the_printed_headline_names_no_missing_dimension():
    """A task whose rows have an encoder on some rows only (concept detection's judge
    counters have none) prints the metric alone, never `nan` after it."""
    from bench.cli.featbench import headline

    frame = finalize(
        [
            {"metric": "mean_feature_auroc", "value": 0.9, "encoder": "native"},
            {"metric": "judge_requests", "value": 3.0},
        ],
        {**RUN, "task": "concept_detection"},
    )
    text = headline(frame)
    assert "mean_feature_auroc native" in text and "nan" not in text
