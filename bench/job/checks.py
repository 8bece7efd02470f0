"""What a job checks around its work: before it (a misspelled task `_target_`, a rank the
data cannot hold), at its start (results already there), and after it (too many failed
judgements). Each failure names the value and what is allowed."""

from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from bench.core.hooks import WIDTHS
from bench.core.storage import atomic_write_text
from bench.data import datasets
from bench.errors import ConfigError, JudgeFailures
from bench.fit.method import Method
from bench.job.plugins import plugin_name
from bench.results import FAILED_FILE, METRICS_FILE, read_metrics

log = logging.getLogger(__name__)

HYDRA_KEYS = ("_target_", "_convert_", "_recursive_", "_partial_", "_args_")  # instantiate's


def completed(job_dir: Path, chash: str, digest: str) -> pd.DataFrame | None:
    """The job's table when `metrics.parquet` holds results of this config hash made by code
    with this code digest (`bench.results.code_digest`: what computes results, not the
    commit), else None, with a log line saying why the job runs again."""
    path = job_dir / METRICS_FILE
    if not path.exists():
        return None
    if (job_dir / FAILED_FILE).exists():  # e.g. too many judge failures: results, not a success
        log.info("%s is marked failed (%s); running the job again", job_dir, FAILED_FILE)
        return None
    try:
        frame, _ = read_metrics(path)
    except Exception as err:  # unreadable: log it and run the job again (the file is replaced)
        log.warning("%s is unreadable (%s); running the job again", path, err)
        return None
    if frame.empty or set(frame["config_hash"].dropna().unique()) != {chash}:
        log.info("%s holds another configuration's results; running the job again", path)
        return None
    found = sorted(frame["code_digest"].dropna().unique()) if "code_digest" in frame else []
    if found != [digest]:
        versions = (
            sorted(frame["code_version"].dropna().unique()) if "code_version" in frame else []
        )
        log.info(
            "%s: results from code %s (%s); the code that computes results is now %s, "
            "so the job runs again",
            path,
            ", ".join(found) or "that recorded no code digest",
            ", ".join(versions) or "no version",
            digest,
        )
        return None
    return frame


def check_judge_failures(frame: pd.DataFrame, limit: float, job_dir: Path) -> None:
    """Raise `JudgeFailures` (after writing failed.json) when more than `limit` of the job's
    judgements failed. The results are already written, so nothing is lost; failed.json
    makes the end-of-sweep callback exit non-zero and makes a rerun run the job again."""
    rows = frame[(frame["metric"] == "judge_failures") & frame["feature"].isna()]
    failed, judged = rows["value"].fillna(0).sum(), rows["n"].fillna(0).sum()
    if judged == 0 or failed / judged <= limit:
        return
    message = (
        f"{failed:.0f} of {judged:.0f} judgements failed ({failed / judged:.0%}), more than "
        f"judge_failure_limit={limit:g}; the results are in {job_dir / METRICS_FILE} but must "
        "not be read as a success. The log names each kind of failure; fix the judge and run "
        "again (the job reruns), or raise judge_failure_limit knowingly"
    )
    record = {
        "error": f"JudgeFailures: {message}",
        "exit_code": 2,
        "judge_failures": int(failed),
        "judgements": int(judged),
    }
    atomic_write_text(job_dir / FAILED_FILE, json.dumps(record))
    raise JudgeFailures(message)


def check_rank(method: Method, cfg: DictConfig, dataset: datasets.ConceptDataset) -> None:
    """A rank above the hook's width (from the model config) or above the train split's
    tokens (bounded by its UTF-8 bytes, one token each at most, plus BOS) fails before the
    model loads; a rank the bound cannot rule out is checked exactly when the method fits."""
    rank = method.bounded_rank()
    if rank is None:
        return
    width = cfg.model.get(WIDTHS[cfg.hook])
    most = sum(
        min(len(dataset.sentences[i].encode()) + 1, cfg.activations.max_length)
        for i in dataset.indices("train")
    )
    limit = min(most, width) if width else most
    if rank > limit:
        if width and width <= most:
            what = f"the {cfg.hook} width of {cfg.model.name} ({width})"
        else:
            what = f"the train split's tokens (at most {most})"
        raise ConfigError(
            f"method {plugin_name(method)}: rank {rank} exceeds {what}; a factorization has "
            f"at most min(tokens, width) features: choose a rank <= {limit}"
        )


def refuse_misspelled_target(node: DictConfig, where: str) -> None:
    """A node without `_target_` is settings for a task that is not selected, and is
    ignored; but a key that looks like a misspelled `_target_` means a task YAML that would
    be dropped silently: that is an error."""
    for name in map(str, node):
        looks = difflib.SequenceMatcher(None, name.strip("_").lower(), "target").ratio() >= 0.8
        if looks or (name.startswith("_") and name not in HYDRA_KEYS):
            raise ConfigError(
                f"{where} has no _target_ but has {name!r}: a misspelled _target_? A task's "
                "YAML names its class with _target_ (e.g. _target_: featbench.tasks.steering.Steering)"
            )
