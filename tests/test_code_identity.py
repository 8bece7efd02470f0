"""Finished jobs survive commits that do not change what computes them, run for real.

A copy of the project's packages becomes its own git repository; the featbench command runs
from that copy (PYTHONPATH first, so the copy's `bench`, `featbench.methods` and
`featbench.tasks` are imported, not the installed ones). The same sweep then runs after a
commit that touches only docs and the README (its job is skipped), and after a commit that
changes one character of a method file (its job runs again, and the log says why).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.results import read_metrics

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SWEEP = ["-m", "method=random", "task=[concept_detection]", "logger=none"]


def _git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture()
def copy(tmp_path) -> Path:
    """The packages, the docs and the README in a git repository of their own, with the
    import layout of an installed featbench (bench/conf, featbench/methods, featbench/tasks)."""
    src = tmp_path / "src"
    for name in ("bench", "conf", "methods", "tasks", "docs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "README.md", src / "README.md")
    (src / "bench" / "conf").symlink_to(src / "conf", target_is_directory=True)
    (src / "featbench").mkdir()
    for name in ("methods", "tasks"):
        (src / "featbench" / name).symlink_to(src / name, target_is_directory=True)
    _git(src, "init", "-q")
    _git(src, "add", "-A")
    _git(src, "commit", "-q", "-m", "copy")
    return src


def _sweep(src: Path, results: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(src), "HYDRA_FULL_ERROR": "0"}
    args = [
        sys.executable,
        "-c",
        "from bench.cli.featbench import cli; cli()",
        *SWEEP,
        f"paths.results_dir={results}",
    ]
    done = subprocess.run(
        args, cwd=results.parent, env=env, capture_output=True, text=True, timeout=600
    )
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-3000:]
    return printed


def test_a_docs_only_commit_reuses_a_finished_job_and_a_method_edit_does_not(copy, tmp_path):
    results = tmp_path / "results"
    first = _sweep(copy, results)
    [path] = results.rglob("metrics.parquet")
    frame, _ = read_metrics(path)
    commit = _git(copy, "rev-parse", "HEAD")[:12]
    assert set(frame["code_version"]) == {f"featbench 0.1.0+g{commit}"}  # the copy ran
    [digest] = set(frame["code_digest"])
    assert "already holds these results" not in first

    (copy / "README.md").write_text("# featbench\n\nA README rewritten.\n")
    (copy / "docs" / "new-page.md").write_text("A new page.\n")
    _git(copy, "add", "-A")
    _git(copy, "commit", "-q", "-m", "docs only")
    again = _sweep(copy, results)
    assert "already holds these results" in again
    assert read_metrics(path)[0]["code_version"].iloc[0] == f"featbench 0.1.0+g{commit}"

    method = copy / "methods" / "random.py"
    method.write_text(method.read_text().replace('"""', '""" ', 1))  # one character
    _git(copy, "commit", "-q", "-am", "one character in a method file")
    rerun = _sweep(copy, results)
    assert "already holds these results" not in rerun
    assert f"results from code {digest}" in rerun and "so the job runs again" in rerun
    frame, _ = read_metrics(path)
    assert set(frame["code_digest"]) != {digest}
    assert set(frame["code_version"]) == {
        f"featbench 0.1.0+g{_git(copy, 'rev-parse', 'HEAD')[:12]}"
    }
