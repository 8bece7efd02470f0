"""The `featbench` command: one Hydra job = model x layer x hook x method x seed.

    featbench                                  # the defaults (conf/config.yaml)
    featbench experiment=smoke                 # a small end-to-end run
    featbench -m method=diffmean layer=3,6     # a sweep (Hydra multirun)
    featbench --cfg job                        # print the composed config

Order of work: validate the config and build the method and task objects
(cheap, so mistakes surface before anything slow), load the dataset, the
model and the cached activations, fit the method on the train split, run each
task, and write `metrics.parquet` (atomically) beside a redacted
`config.yaml` and the fitted features.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from bench import activations, datasets
from bench.config import validate
from bench.contexts import top_contexts
from bench.errors import ConfigError, FeatbenchError
from bench.judges.base import Judge
from bench.models import load_model
from bench.results import (
    METRICS_FILE,
    REDACTED,
    config_hash,
    finalize,
    is_secret_name,
    redact,
    write_metrics,
)
from bench.storage import atomic_write_text
from methods.base import Method
from tasks.base import Task, TaskData

log = logging.getLogger(__name__)

# Errors a user can fix: shown as one line, no traceback (anything else is a bug).
USER_ERRORS = (FeatbenchError, FloatingPointError)


def plugin_name(obj: object) -> str:
    """A plugin's `name` class attribute, else its class name in lower case."""
    return getattr(type(obj), "name", None) or type(obj).__name__.lower()


def build(node: DictConfig, kind: str, base: type) -> Any:
    """Instantiate a `_target_` node and check it implements the contract."""
    try:
        obj = hydra.utils.instantiate(node, _convert_="all")
    except InstantiationException as err:
        raise ConfigError(f"{kind} {node.get('_target_')!r} could not be built: {err}") from None
    if not isinstance(obj, base):
        raise ConfigError(
            f"{kind} {node.get('_target_')!r} is not a {base.__module__}.{base.__name__} subclass"
        )
    return obj


def run_job(cfg: DictConfig, job_dir: Path) -> pd.DataFrame:
    """Run one job into `job_dir`; returns the tidy metrics table it wrote."""
    started = time.perf_counter()
    validate(cfg)
    method: Method = build(cfg.method, "method", Method)
    tasks: dict[str, Task] = {
        key: build(node, f"task {key}", Task) for key, node in cfg.task.items()
    }
    judge = build(cfg.judge, "judge", Judge) if cfg.judge and cfg.judge.get("_target_") else None
    for key, task in tasks.items():
        if getattr(task, "needs_judge", False) and judge is None:
            raise ConfigError(f"task {key} needs a judge; choose judge=offline, openai or hf_chat")
    container = OmegaConf.to_container(cfg, resolve=True)
    chash = config_hash(container)
    job_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        job_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(redact(container)))
    )
    torch.manual_seed(cfg.seed)

    dataset = datasets.load(**{k: v for k, v in container["dataset"].items() if k != "name"})
    if method.requires_labels and len(dataset.concepts) < 2:
        raise ConfigError(
            f"method {plugin_name(method)} needs at least two concepts; dataset has {dataset.concepts}"
        )

    loaded = load_model(
        cfg.model.name, cfg.model.source, cfg.model.path, cfg.device, cfg.dtype, cfg.model.n_ctx
    )
    model = loaded.model
    acts = activations.extract(
        model,
        dataset,
        cfg.layer,
        cfg.hook,
        model_fingerprint=loaded.fingerprint,
        batch_tokens=cfg.activations.batch_tokens,
        max_length=cfg.activations.max_length,
        dtype=cfg.activations.dtype,
    )
    train = acts.subset(dataset.indices("train"))
    fit_start = time.perf_counter()
    features = method.fit(train)
    fit_seconds = time.perf_counter() - fit_start
    features.info.setdefault("fit_seconds", fit_seconds)
    features.save(job_dir / "features")
    contexts = top_contexts(features, train, model.tokenizer)
    atomic_write_text(
        job_dir / "features" / "contexts.json", json.dumps(contexts, indent=1, ensure_ascii=False)
    )
    log.info(
        "%s: %d features fitted on %d tokens in %.1f s",
        plugin_name(method),
        len(features),
        len(train),
        fit_seconds,
    )

    data = TaskData(dataset, acts, cfg.layer, cfg.hook, cfg.seed, job_dir, judge)
    run = {
        "run_id": f"{plugin_name(method)}-{chash[:10]}",
        "model": cfg.model.name,
        "layer": cfg.layer,
        "hook": acts.hook,
        "method": plugin_name(method),
        "seed": cfg.seed,
        "config_hash": chash,
    }
    tables = []
    for task in tasks.values():
        rows = task.evaluate(model, features, data, cfg)
        tables.append(finalize(rows, {**run, "task": plugin_name(task)}))
    frame = pd.concat(tables, ignore_index=True) if tables else finalize([], {**run, "task": ""})
    meta = {
        "overrides": _overrides(),
        "seconds": time.perf_counter() - started,
        "model_load_seconds": loaded.load_seconds,
    }
    write_metrics(frame, job_dir / METRICS_FILE, meta)
    log.info("wrote %s (%d rows) in %.1f s", job_dir / METRICS_FILE, len(frame), meta["seconds"])
    return frame


def _overrides() -> list[str]:
    """The command-line overrides, with the values of secret-named keys redacted."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not running under Hydra (tests calling run_job directly)
        return []
    redacted = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        secret = sep and is_secret_name(key.lstrip("+~").rsplit(".", 1)[-1])
        redacted.append(f"{key}={REDACTED}" if secret else item)
    return redacted


def headline(frame: pd.DataFrame) -> str:
    """The job's summary rows (no feature, no concept) as text: one block per task,
    one line per metric (and generator/noise where the task has them), with the
    95% interval where the task gives one."""
    summary = frame[frame["feature"].isna() & frame["concept"].isna()]
    if summary.empty:
        return "(no summary rows)"
    blocks = []
    for task, rows in summary.groupby("task", sort=False):
        dims = [c for c in ("generator", "noise") if c in rows and rows[c].notna().any()]
        lines = []
        for _, row in rows.iterrows():
            label = " ".join(str(row[c]) for c in ["metric", *dims])
            value = "missing" if pd.isna(row["value"]) else f"{row['value']:.4f}"
            if "ci_low" in row and pd.notna(row["ci_low"]):
                value += f"  [{row['ci_low']:.4f}, {row['ci_high']:.4f}]"
            lines.append(f"  {label:<34} {value}")
        blocks.append(f"{task}\n" + "\n".join(lines))
    return "\n".join(blocks)


@hydra.main(version_base="1.3", config_path="pkg://bench.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        frame = run_job(cfg, job_dir)
    except USER_ERRORS as err:
        log.error("%s", err)
        sys.exit(2)
    log.info("results in %s\n%s", job_dir, headline(frame))


def secret_overrides(argv: list[str]) -> list[str]:
    """Command-line overrides that set a secret-named key to a literal value.

    Hydra writes the command line to disk (multirun.yaml) and to its logs, so
    a secret given there would leak; `${oc.env:NAME}` keeps it in the
    environment, where it belongs.
    """
    found = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-"):
            continue
        name = key.lstrip("+~").rsplit(".", 1)[-1]
        if is_secret_name(name) and not value.strip().startswith("${"):
            found.append(key)
    return found


def cli() -> None:
    """Console-script entry point."""
    leaked = secret_overrides(sys.argv[1:])
    if leaked:
        sys.stderr.write(
            f"featbench: {', '.join(leaked)} set on the command line; Hydra would save the value in "
            "its logs and sweep files. Put the secret in an environment variable and name the "
            "variable instead, e.g. 'judge.api_key_env=OPENAI_API_KEY' (the openai judge reads it).\n"
        )
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
