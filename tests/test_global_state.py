"""Process-wide state that featbench used to change behind its caller's back (issue 18,
"Hidden global state"): each is now an explicit call, a scoped context, or a read that
changes nothing.

- The folder-name resolvers (bench/cli/naming.py) and the typed schema (bench/job/config.py) are
  registered by an explicit, idempotent call, not by importing the modules; the sweep's
  folder is named from Hydra's own overrides, not from `sys.argv`.
- A job seeds torch inside a fork of the random state (bench/job/run.py `seeded`): it draws
  what `torch.manual_seed(seed)` gives, and the caller's state is untouched after it.
- The umask is read without being set (bench/core/storage.py `process_umask`), at write time.

(W&B's error-reporting variable, scoped to W&B's calls: tests/test_tracking.py.)
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf

import bench.core.storage
import bench.job.run
import bench.job.stages
from bench.cli.naming import register_resolvers
from bench.core.storage import atomic_write_text, process_umask
from bench.errors import FeatbenchError
from bench.job.config import register_schema
from bench.job.identity import Identity, seeded

REPO = Path(__file__).resolve().parents[1]

# A fresh interpreter: what importing the modules does by itself (the test session has
# registered everything already, through tests/conftest.py).
IMPORT_ONLY = """
import os
calls = []
real = os.umask
os.umask = lambda mask: (calls.append(mask), real(mask))[1]
import bench.core.storage, bench.cli.naming, bench.job.config
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
names = ("fb_sweep_name", "fb_job_name")
stored = lambda: "featbench_schema.yaml" in ConfigStore.instance().repo
print("umask calls at import:", calls)
print("after import:", [OmegaConf.has_resolver(n) for n in names], stored())
bench.cli.naming.register_resolvers(); bench.cli.naming.register_resolvers()
bench.job.config.register_schema(); bench.job.config.register_schema()
print("after register:", [OmegaConf.has_resolver(n) for n in names], stored())
"""


def test_importing_the_modules_registers_nothing_and_changes_no_umask():
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_ONLY], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == [
        "umask calls at import: []",
        "after import: [False, False] False",
        "after register: [True, True] True",  # twice is fine: idempotent
    ]


# --- the sweep's folder: from Hydra's overrides, never sys.argv -----------------------


def _loader():
    register_schema()
    register_resolvers()
    return GlobalHydra.instance().config_loader()


def test_sweep_folder_comes_from_hydras_overrides_and_every_job_shares_it(tmp_path, monkeypatch):
    """The master config names the sweep from `hydra.overrides.task`; a job's config,
    built as a launcher builds it (`load_sweep_config`), reads the same folder, although
    its own overrides differ, and names its subfolder from its own."""
    monkeypatch.setattr(sys, "argv", ["pytest", "unrelated=1", "judge.model=other"])
    results = tmp_path / "results"
    fixed = ["layer=2", "logger=none", f"paths.results_dir={results}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        loader = _loader()
        master = loader.load_configuration(
            "config", ["method=diffmean,random", *fixed], run_mode=RunMode.MULTIRUN
        )
        sweep = f"{results}/multirun/layer=2__method=diffmean,random"
        assert master.hydra.sweep.dir == sweep  # not `unrelated=1__...` from sys.argv
        jobs = [
            loader.load_sweep_config(master, [f"method={m}", *fixed])
            for m in ("random", "diffmean")
        ]
    assert [job.hydra.sweep.dir for job in jobs] == [sweep, sweep]
    assert [job.hydra.sweep.subdir for job in jobs] == [
        "layer=2,method=random",
        "layer=2,method=diffmean",
    ]


def test_a_sweep_without_overrides_is_default():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        bare = _loader().load_configuration("config", [], run_mode=RunMode.MULTIRUN)
    assert bare.hydra.sweep.dir == "results/multirun/default"


# --- a job's random state -----------------------------------------------------------


class _Drew(FeatbenchError):
    """Raised by the stand-in dataset loader once it has drawn its numbers."""


DRAWN: list[torch.Tensor] = []


def _drawing_loader(**settings):
    """The stand-in dataset loader (the job's `dataset._target_`): draws, then stops the job."""
    DRAWN.append(torch.randn(5))
    raise _Drew


def test_a_job_draws_the_seeds_numbers_and_leaves_the_callers_random_state(tmp_path, monkeypatch):
    """`_run_locked` around the real `_run`, stopped at its first step (the dataset): the
    job draws from the global generator exactly what `torch.manual_seed(seed)` gives (a
    plugin calling torch.randn without a generator gets today's numbers), and the
    caller's generator continues as if the job had never run, also when the job fails."""
    DRAWN.clear()
    monkeypatch.setattr(bench.job.run, "code_digest", lambda: "digest-test")
    loader = f"{__name__}.{_drawing_loader.__name__}"
    cfg = OmegaConf.create(
        {"seed": 7, "force": False, "device": "cpu", "dataset": {"_target_": loader}}
    )
    identity = Identity({"seed": 7}, {}, "c0ffee", "5e771")

    torch.manual_seed(1234)
    expected_caller = torch.randn(3)
    torch.manual_seed(1234)
    with pytest.raises(_Drew):
        plan = bench.job.stages.Plan(identity, None, {}, None, source=None, checked=True)
        bench.job.run._run_locked(cfg, tmp_path, plan, None, "g", "n", 0.0)
    assert torch.equal(torch.randn(3), expected_caller)  # the caller's sequence goes on
    torch.manual_seed(7)
    assert torch.equal(DRAWN[0], torch.randn(5))  # what the process-wide seed gave


def test_seeded_restores_the_state_and_repeats_the_draws():
    before = torch.get_rng_state()
    with seeded(3, "cpu"):
        first = torch.rand(4)
    with seeded(3, "cpu"):
        again = torch.rand(4)
    assert torch.equal(first, again)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(4), first)


# --- the umask: read, never set -------------------------------------------------------


@pytest.fixture()
def umask_027():
    set_umask = os.umask  # the real one: a test may replace os.umask before this teardown
    old = set_umask(0o027)
    try:
        yield
    finally:
        set_umask(old)


@pytest.mark.skipif(not Path(bench.core.storage.PROC_STATUS).is_file(), reason="no /proc")
def test_umask_is_read_without_setting_it(monkeypatch, umask_027):
    def refuse(mask):
        raise AssertionError("os.umask called: the umask was set to read it")

    monkeypatch.setattr(os, "umask", refuse)
    assert process_umask() == 0o027


def test_without_proc_the_fallback_reads_the_umask_and_puts_it_back(monkeypatch, umask_027):
    monkeypatch.setattr(bench.core.storage, "PROC_STATUS", "/nonexistent/status")
    assert process_umask() == 0o027
    assert os.umask(0o027) == 0o027  # unchanged by the read


def test_atomic_writes_follow_the_umask_at_write_time(tmp_path, umask_027):
    """The mode is computed when the file is written (an import-time constant kept the
    umask of whenever bench.core.storage was first imported)."""
    written = atomic_write_text(tmp_path / "f", "x")
    assert stat.S_IMODE(written.stat().st_mode) == 0o640


def test_a_jobs_cache_folder_is_scoped_to_the_job(tmp_path, monkeypatch):
    """`paths.cache_dir` moves every cache of the job (models, activations, judge answers)
    for the job only: after it, and in other contexts, the environment's folder is back."""
    from bench.core.storage import cache_dir, using_cache

    monkeypatch.setenv("FEATBENCH_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    with using_cache(str(tmp_path / "job")):
        assert cache_dir() == tmp_path / "job"
        with using_cache(None):  # a job that sets none keeps the environment's
            assert cache_dir() == tmp_path / "env"
    assert cache_dir() == tmp_path / "env"
