"""The task contract: `Task.evaluate(model, features, data, cfg) -> rows`.

A task gets the model, the features of one method (it never knows which
method), and the run's data; it returns tidy rows (dicts with `metric`,
`value` and its own dimensions: `feature`, `concept`, `kl_target`, `sign`,
extra columns such as `reason`). `bench.results.finalize` adds the run's
columns. A missing value is `value=None` with a `reason`, never a 0.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from bench.activations.set import ActivationSet
from bench.core.stages import Stages
from bench.data.datasets import NEUTRAL, ConceptDataset
from bench.errors import ConfigError
from bench.fit.encodings import Encodings
from bench.fit.features import Features
from bench.judges.base import Judge

#: the value of a task setting left to its protocol (a preset of values the task declares)
PROTOCOL = "protocol"


@dataclass(kw_only=True)
class TaskData:
    """What a task may use besides the model and the features (keyword arguments: the hook is
    `activations.hook`, the layer is in it)."""

    dataset: ConceptDataset  # sentences, labels and the train/test split
    activations: ActivationSet  # every sentence's tokens at the features' hook
    seed: int  # the run's seed: the one way a task gets it
    output_dir: Path  # the job's directory, for artifacts and checkpoints
    judge: Judge | None = None  # the configured judge (tasks that score text need one)
    # keys the task's checkpoints in output_dir (the job's config hash and code digest); None:
    # the task cannot resume, and says so
    checkpoint_key: str | None = None
    stage: Stages = field(default_factory=Stages)  # the job's stage timer: tasks time their parts
    _encodings: Encodings | None = field(default=None, init=False, repr=False)

    def encodings(self, features: Features) -> Encodings:
        """The codes of `features` for every row of `activations`, made once per job: every
        task (and the job's contexts) asks here instead of encoding again."""
        if self._encodings is None or self._encodings.features is not features:
            self._encodings = Encodings(features, self.activations, len(self.dataset))
        return self._encodings


@dataclass(frozen=True)
class Headline:
    """A summary metric the report tabulates for a task, and which way is better."""

    metric: str
    higher_is_better: bool | None = True  # None: a count or diagnostic with no better side


class Task(ABC):
    """An evaluation. Subclasses are dataclasses of their config.

    Besides `evaluate`, a task declares what the report needs to know about it, so a new
    task never edits `bench/report`: its table's `title`, its `headlines` (the summary
    metrics to tabulate, the task's headline first, each with its direction), its place in
    the report (`report_order`), and whether settings are compared on its headlines
    (`compared`: paired differences need units every setting shares). The job writes the
    declaration into metrics.parquet's metadata (`declaration()`), and the report reads it
    from there.
    """

    #: value of the results' `task` column (None: the class name in lower case)
    name: ClassVar[str | None] = None
    #: True when the task scores text and needs a judge (`judge=none` is refused before work)
    needs_judge: ClassVar[bool] = False
    #: concepts besides neutral the task needs (checked when the dataset is loaded)
    min_concepts: ClassVar[int] = 0
    #: True when some metric needs `neutral` sentences in the test split (e.g. S_CD)
    needs_neutral: ClassVar[bool] = False
    #: True when the task scores held-out sentences (refused when the split has none)
    needs_test_split: ClassVar[bool] = False
    #: the title of the task's table in the report (None: the task's name)
    title: ClassVar[str | None] = None
    #: summary metrics the report tabulates, the headline first (empty: every summary metric)
    headlines: ClassVar[tuple[Headline, ...]] = ()
    #: the report's order of tasks, lowest first (its tables and its comparison columns)
    report_order: ClassVar[int] = 100
    #: whether the report computes differences between settings on the headlines
    compared: ClassVar[bool] = True

    @classmethod
    def declaration(cls) -> dict[str, Any]:
        """What the report reads about this task, as JSON-able data (see the class doc)."""
        name = cls.name or cls.__name__.lower()
        return {
            "title": cls.title or name,
            "headlines": [
                {"metric": h.metric, "higher_is_better": h.higher_is_better} for h in cls.headlines
            ],
            "report_order": cls.report_order,
            "compared": cls.compared,
        }

    def check_judge(self, judge: Judge | None) -> None:
        """Refuse a judge this task's settings cannot use, before anything is loaded
        (raise ConfigError); accepts anything by default."""
        return None

    def check_dataset(self, dataset: ConceptDataset) -> list[str]:
        """Warnings (texts) about a dataset this task can score only in part, for the
        caller to log at load time; none by default. A task that sets `needs_neutral`
        warns here when the test split has no neutral sentence; one that sets
        `needs_test_split` refuses a dataset without a test split (ConfigError)."""
        name = self.name or type(self).__name__.lower()
        if self.needs_test_split and "test" not in dataset.splits:
            raise ConfigError(
                f"task {name} scores held-out sentences and dataset {dataset.source} has no test "
                "split (dataset.test_fraction=0); set dataset.test_fraction > 0 or drop the task"
            )
        if not self.needs_neutral:
            return []
        test_labels = [
            lab for lab, s in zip(dataset.labels, dataset.splits, strict=True) if s == "test"
        ]
        if NEUTRAL in test_labels:
            return []
        return [
            f"task {self.name or type(self).__name__.lower()} needs {NEUTRAL!r} sentences in the "
            f"test split and dataset {dataset.source} has none: the metrics that need them will be missing"
        ]

    @abstractmethod
    def evaluate(self, model: Any, features: Features, data: TaskData, cfg: Any) -> list[dict]:
        """Return tidy result rows."""
