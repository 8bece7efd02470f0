"""Model and dataset sources are plugins, as methods are: a researcher's own classes,
named by `_target_` from outside the repo, load the model and read the sentences of a
real job on the embedded model."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pandas as pd
import pytest

from bench.errors import ConfigError
from bench.models import EmbeddedSource, HubSource, LocalSource, ModelSource
from tests.conftest import featbench_cmd

PLUGIN = textwrap.dedent(
    '''
    from dataclasses import dataclass
    from pathlib import Path

    from bench.data.datasets import load
    from bench.models import EmbeddedSource


    @dataclass(frozen=True)
    class Recorded(EmbeddedSource):
        """The embedded source (the model YAML's gguf and tl_config), with every call
        written to `record`."""

        record: str = "calls.txt"

        def _note(self, line):
            with open(self.record, "a") as handle:
                handle.write(line + "\\n")

        def check(self, name):
            self._note(f"check {name}")
            return True

        def load(self, name, n_ctx, checked):
            self._note(f"load {name} {n_ctx} {checked}")
            return super().load(name, n_ctx, checked)


    def food_and_music(**settings):
        """The shipped sentences of two concepts, whatever the config keeps."""
        Path("dataset.txt").write_text(settings["name"])
        return load(**{**settings, "concepts": ["food", "music"]})
    '''
)


@pytest.mark.integration
def test_a_model_source_and_a_dataset_from_outside_the_repo_run_a_job(tmp_path, embedded):
    plugins = tmp_path / "plugins" / "my_sources"
    plugins.mkdir(parents=True)
    (plugins / "__init__.py").write_text(PLUGIN)
    env = {**os.environ, "PYTHONPATH": str(plugins.parent)}
    record = tmp_path / "calls.txt"
    args = [
        "experiment=smoke",
        "task=[concept_detection]",
        "logger=none",
        "hydra.mode=RUN",
        f"hydra.run.dir={tmp_path / 'job'}",
        "model.source._target_=my_sources.Recorded",
        f"+model.source.record={record}",
        "dataset._target_=my_sources.food_and_music",
        "dataset.name=two-concepts",
    ]
    out = subprocess.run(
        featbench_cmd() + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # checked once before the model loads, then loaded with that answer
    assert record.read_text().splitlines() == ["check smollm2-135m", "load smollm2-135m 2048 True"]
    assert (tmp_path / "dataset.txt").read_text() == "two-concepts"
    frame = pd.read_parquet(tmp_path / "job" / "metrics.parquet")
    assert set(frame["concept"].dropna()) == {"food", "music"}  # the plugin's two, not smoke's six
    # the embedded source's fingerprint (which keys the activation cache), recorded
    features = json.loads((tmp_path / "job" / "features" / "features.json").read_text())
    assert features["provenance"]["model_fingerprint"] == embedded.fingerprint


def test_the_shipped_sources_are_model_sources_and_hashable():
    sources = [EmbeddedSource(), HubSource(), LocalSource("/some/dir", "google/gemma-3-270m")]
    assert all(isinstance(s, ModelSource) for s in sources)
    assert len({*sources, *sources}) == 3  # one memoized model per distinct source


def test_a_local_source_without_a_path_names_the_override():
    with pytest.raises(ConfigError, match=r"model=hf_local model.source.path=<dir>"):
        LocalSource()


def test_an_old_style_source_string_is_refused_naming_the_plugins(tmp_path):
    out = subprocess.run(
        featbench_cmd()
        + ["model.source=local", "hydra.mode=RUN", f"hydra.run.dir={tmp_path / 'job'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    printed = out.stdout + out.stderr
    assert out.returncode == 2, printed[-2000:]
    assert "model.source='local' names no _target_" in printed
    assert "EmbeddedSource, HubSource, LocalSource" in printed
