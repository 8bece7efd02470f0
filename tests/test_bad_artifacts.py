"""Bad artifacts and unsafe formats: a tampered features artifact or SAE folder fails naming
the file (before any model loads where it can), and no source file can deserialize code
(no pickle family, no torch.load without weights_only=True). Split from
tests/test_bad_input.py, whose bad-input matrix these complete."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from featbench.methods.base import ArtifactError, Features
from featbench.methods.sae_pretrained import SAEPretrained, SAEUnavailable
from tests.conftest import REPO

HOOK = "blocks.0.mlp.hook_post"


# -- artifacts ---------------------------------------------------------------------------------


@pytest.fixture()
def sae_artifact(tmp_path) -> Path:
    """A saved SAEFeatures artifact (the subclass with the most checks on load)."""
    from sae_lens import SAE

    from featbench.methods.topk_sae import sae_features

    sae = SAE.from_dict(
        {"architecture": "standard", "d_in": 8, "d_sae": 4, "metadata": {"hook_name": HOOK}}
    )
    return sae_features(sae, method="demo", hook=HOOK, info={}).save(tmp_path / "features")


def _edit_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


ARTIFACT_TAMPERING = {
    "json emptied": lambda d: (d / "features.json").write_text(""),
    "json is null": lambda d: (d / "features.json").write_text("null"),
    "json not utf-8": lambda d: (d / "features.json").write_bytes(b"\xff\xfe{"),
    "sae spec removed": lambda d: _edit_json(d / "features.json", lambda m: m["info"].pop("sae")),
    "labels miscounted": lambda d: _edit_json(
        d / "features.json", lambda m: m.update(labels=["x"])
    ),
    "extra not a list": lambda d: _edit_json(d / "features.json", lambda m: m.update(extra=3)),
    "extra tensor dropped": lambda d: _edit_json(
        d / "features.json", lambda m: m.update(extra=m["extra"][1:])
    ),
    "format version": lambda d: _edit_json(
        d / "features.json", lambda m: m.update(format_version=99)
    ),
    "tensors zero bytes": lambda d: (d / "features.safetensors").write_bytes(b""),
    "tensors garbage": lambda d: (d / "features.safetensors").write_bytes(b"\x00" * 64),
    "tensors truncated": lambda d: (d / "features.safetensors").write_bytes(
        (d / "features.safetensors").read_bytes()[:-10]
    ),
}


@pytest.mark.parametrize("case", ARTIFACT_TAMPERING, ids=str)
def test_tampered_artifact_fails_naming_the_file(sae_artifact, case):
    ARTIFACT_TAMPERING[case](sae_artifact)
    with pytest.raises(ArtifactError) as err:
        Features.load(sae_artifact)
    assert str(sae_artifact) in str(err.value), str(err.value)


def _saved_sae(folder: Path) -> Path:
    from sae_lens import SAE

    SAE.from_dict({"architecture": "standard", "d_in": 8, "d_sae": 4}).save_model(folder)
    return folder


@pytest.mark.parametrize(
    ("tamper", "bad_file", "message"),
    [
        (lambda f: f.write_text('{"architecture": "stand'), "cfg.json", "not valid JSON"),
        (lambda f: f.write_text("[1, 2]"), "cfg.json", "must hold a JSON object"),
        (
            lambda f: f.write_bytes(f.read_bytes()[:-16]),
            "sae_weights.safetensors",
            "not a readable safetensors",
        ),
        (
            lambda f: f.write_bytes(b"garbage"),
            "sae_weights.safetensors",
            "not a readable safetensors",
        ),
    ],
    ids=["cfg truncated", "cfg not an object", "weights truncated", "weights garbage"],
)
def test_tampered_sae_folder_fails_at_construction_naming_the_file(
    tmp_path, tamper, bad_file, message
):
    folder = _saved_sae(tmp_path / "sae")
    tamper(folder / bad_file)
    with pytest.raises(SAEUnavailable, match=message) as err:
        SAEPretrained(path=str(folder))  # the constructor: before any model loads
    assert str(folder / bad_file) in str(err.value)


def test_sae_folder_sae_lens_cannot_read_is_named(tmp_path):
    folder = _saved_sae(tmp_path / "sae")
    (folder / "cfg.json").write_text("{}")  # JSON, but not an SAE config
    method = SAEPretrained(path=str(folder))
    with pytest.raises(SAEUnavailable, match="cannot be loaded") as err:
        method.load()
    assert str(folder) in str(err.value)


# -- no artifact format can execute code -------------------------------------------------------

SCANNED = ("bench", "methods", "tasks", "benchmarks", "tests")
CODE_EXECUTING_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "shelve", "joblib"}


def unsafe_loads(source: str) -> list[str]:
    """What in `source` can deserialize code: pickle-family imports, any name or attribute
    with "pickle" in it (read_pickle, allow_pickle, ...), torch.load without weights_only=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [alias.name for alias in node.names]
        for name in names:
            if name.split(".")[0] in CODE_EXECUTING_MODULES or "pickle" in name.lower():
                found.append(f"line {node.lineno}: import {name}")
        word = (
            getattr(node, "id", None) or getattr(node, "attr", None) or getattr(node, "arg", None)
        )
        if isinstance(word, str) and "pickle" in word.lower():
            found.append(f"line {node.lineno}: {word}")
        if isinstance(node, ast.Call) and _is_torch_load(node.func):
            safe = any(
                k.arg == "weights_only"
                and isinstance(k.value, ast.Constant)
                and k.value.value is True
                for k in node.keywords
            )
            if not safe:
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
    return found


def _is_torch_load(func: ast.expr) -> bool:
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "load"
        and isinstance(func.value, ast.Name)
        and func.value.id == "torch"
    )


def test_the_scanner_catches_what_it_looks_for():
    bad = (
        "import pickle\nfrom joblib import load\nimport torch\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\n"
        "pd.read_pickle('x')\n"
    )
    assert len(unsafe_loads(bad)) == 6, unsafe_loads(bad)
    assert unsafe_loads("import torch\ntorch.load('x', weights_only=True)\n") == []


def test_no_source_file_can_deserialize_code():
    this = Path(__file__).resolve()
    files = [p for d in SCANNED for p in sorted((REPO / d).rglob("*.py")) if p.resolve() != this]
    assert len(files) > 30  # the tree was found
    problems = {
        str(p.relative_to(REPO)): found
        for p in files
        if (found := unsafe_loads(p.read_text(encoding="utf-8")))
    }
    assert problems == {}
