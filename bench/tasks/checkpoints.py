"""Checkpoints of partial task results inside a job's folder.

A task that works item by item (steering, one feature at a time) saves each
finished item, so a job that is killed resumes at the next one instead of
starting over. `bench.job.run` deletes a job's checkpoints once its
`metrics.parquet` is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from bench.core.storage import atomic_write_text

log = logging.getLogger(__name__)


class Checkpoints:
    """One JSON file per finished feature, so an interrupted job resumes where it
    stopped. A file counts only when it was written for the same job configuration
    (config hash), the same checkpoint format (version) and the same direction, so
    a changed fit or an older format never reuses old texts.
    Writes are atomic: a job killed mid-write leaves the previous state."""

    def __init__(self, folder: Path, key: str, version: str = "") -> None:
        # key: the job's checkpoint key (its config hash and code digest); version: the
        # task's checkpoint format, bumped when what it saves changes meaning, so
        # checkpoints written by older code are not reused
        if not key:
            raise ValueError(
                f"a checkpoint key is required for the checkpoints in {folder} (got {key!r}): "
                "without one a resumed job could take another configuration's results"
            )
        self.folder, self.key, self.version = folder, key, version
        self.failed = False  # set when the folder refused a write: no more attempts

    def _key(self, direction: torch.Tensor) -> str:
        data = direction.detach().cpu().float().contiguous().numpy().tobytes()
        digest = hashlib.sha256(data).hexdigest()[:16]
        return f"{self.version}:{self.key}:{digest}" if self.version else f"{self.key}:{digest}"

    def load(self, feature: int, direction: torch.Tensor, stage: str = "feature") -> dict | None:
        """The saved result of `feature` at `stage` (a task's name for how far the item
        got, e.g. steering's `generated` texts before its judged `feature` rows), if saved
        by this configuration for this direction."""
        path = self.folder / f"{stage}_{feature}.json"
        if not path.exists():
            return None
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable checkpoint %s: %s", path, err)
            return None
        if saved.get("key") != self._key(direction):
            return None
        log.info("%s %d resumed from %s", stage, feature, path)
        return saved["result"]

    def save(
        self, feature: int, direction: torch.Tensor, result: dict, stage: str = "feature"
    ) -> None:
        """Save one finished item. A folder that takes no file (a full or read-only disk)
        only loses the ability to resume: it is logged once, and the job goes on with its
        results in memory (the job saves them to its rescue folder if the folder still refuses)."""
        if self.failed:
            return
        record = {"key": self._key(direction), "result": result}
        try:
            atomic_write_text(self.folder / f"{stage}_{feature}.json", json.dumps(record))
        except OSError as err:
            self.failed = True
            log.warning(
                "cannot checkpoint to %s (%s); the job goes on without checkpoints, "
                "its results kept in memory",
                self.folder,
                err.strerror or err,
            )
