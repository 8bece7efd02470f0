"""The task plugin contract, re-exported for plugins: `Task.evaluate(model, features, data,
cfg) -> rows` (defined in `bench.tasks.base`, which documents it). A plugin imports it from
here: `from featbench.tasks.base import Headline, Task, TaskData`."""

from __future__ import annotations

from bench.tasks.base import Headline, Task, TaskData

__all__ = ["Headline", "Task", "TaskData"]
