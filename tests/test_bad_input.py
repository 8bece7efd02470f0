"""Issue 7's bad-input matrix: every bad value gives a clear error that names it and
what is allowed, before any expensive work where the value can be judged by then.

Already covered elsewhere, so not repeated here:

- unknown model name, listing the choices: test_app.py::test_unknown_group_option_lists_the_choices
- unknown top-level and dataset keys (CLI): test_app.py::test_unknown_key_is_hydras_error
- bad layer, hook, dataset path, method target, through the CLI, before the model loads:
  test_app.py::test_bad_values_fail_before_the_model_loads
- layer out of range at extraction: test_activations.py::test_layer_out_of_range_names_valid_range,
  test_core_units.py::test_hook_names_are_canonical_and_checked
- SNMF sparsity/init and rank > width: test_methods.py::test_snmf_bad_settings; Neurons
  n_features > width: test_methods.py::test_controls; TopK SAE k/d_sae/lr:
  test_sae_methods.py::test_topk_sae_rejects_bad_config; sae_pretrained settings:
  test_sae_methods.py::test_sae_pretrained_config_errors
- steering prompts, kl_targets, max_features, description, top_p (constructor):
  test_steering_units.py::test_bad_settings_name_the_value_and_what_is_allowed
- malformed datasets: test_datasets.py (test_bad_jsonl_rows_are_named,
  test_too_few_sentences_for_a_concept, test_duplicate_sentences_name_both_rows, test_not_utf8,
  test_not_the_format_claimed, test_missing_file_and_bad_fraction, test_selection_caps_and_filters)
- long sentences truncated with a warning:
  test_activations.py::test_long_sentences_are_truncated_and_counted
- NaN/Inf activations name hook and token:
  test_activations.py::test_non_finite_activation_names_hook_and_token
- tampered or truncated Features artifacts:
  test_core_units.py::test_features_round_trip_and_tampering
- corrupt activation-cache entries are rebuilt:
  test_activations.py::test_corrupt_cache_entry_is_rebuilt
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

import bench.job.run
import bench.job.stages
from bench.activations.extraction import extract
from bench.data.datasets import NEUTRAL, ConceptDataset
from bench.errors import ConfigError, FeatbenchError
from featbench.methods.base import ActivationSet
from featbench.methods.diffmean import DiffMean
from featbench.methods.neurons import Neurons
from featbench.methods.pca import PCA
from featbench.methods.random import RandomDirections
from featbench.methods.snmf import SNMF, make_features
from featbench.methods.snmf_hier import HierarchicalSNMF
from featbench.methods.topk_sae import TopKSAE
from featbench.tasks.base import TaskData
from featbench.tasks.concept_detection import ConceptDetection
from tests.conftest import REPO

HOOK = "blocks.0.mlp.hook_post"


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def _acts(x: torch.Tensor, labels: list[str] | None = None, per_sentence: int = 5) -> ActivationSet:
    n = x.shape[0]
    sentence_ids = torch.arange(n) // per_sentence
    ids = torch.zeros(n, dtype=torch.long)
    return ActivationSet(x, ids, sentence_ids, torch.ones(n, dtype=torch.long), HOOK, labels)


def _labels(n_sentences: int, names=("a", "b", NEUTRAL)) -> list[str]:
    return [names[i % len(names)] for i in range(n_sentences)]


# -- config: names and keys (Hydra's own errors) ---------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("method=nope", ["Could not find 'method/nope'", "snmf", "diffmean"]),
        ("judge=nope", ["Could not find 'judge/nope'", "offline", "openai"]),
        ("experiment=nope", ["Could not find 'experiment/nope'", "smoke"]),
        ("logger=nope", ["Could not find 'logger/nope'", "none"]),
        # Hydra lists no choices for an entry of a list group; it still names the bad one.
        ("task=[concept_detection,nope]", ["'task/nope'"]),
    ],
)
def test_unknown_group_option_is_named_with_its_choices(override, expected):
    with pytest.raises(HydraException) as err:
        _compose([override])
    for text in expected:
        assert text in str(err.value), (override, str(err.value))


@pytest.mark.parametrize(
    "override",
    ["method.rnak=5", "model.nope=1", "task.concept_detection.nope=1", "activations.nope=1"],
)
def test_unknown_nested_key_is_hydras_error(override):
    with pytest.raises(HydraException, match=f"Could not override '{override.split('=')[0]}'"):
        _compose([override])


# -- config: values, checked before the model loads -------------------------------------------


@pytest.fixture()
def no_expensive_work(monkeypatch):
    """Model loading and activation extraction fail the test if they are reached."""

    def forbidden(*args, **kwargs):
        raise AssertionError("expensive work started before the bad value was rejected")

    monkeypatch.setattr(bench.job.stages, "load_model", forbidden)
    monkeypatch.setattr(bench.job.stages.activations, "extract", forbidden)


# A small, judge-free base, so each case reaches only the check it is about; a case that
# sets one of these groups (or any dataset key) replaces that part of the base.
BASE = {
    "task": ["task=[concept_detection]"],
    "judge": ["judge=none"],
    "logger": ["logger=none"],
    "dataset": [
        "dataset.concepts=[food,music]",
        "dataset.max_per_concept=4",
        "dataset.max_neutral=4",
    ],
}
STEERING = ["task=[steering]"]


def _with_base(overrides: list[str]) -> list[str]:
    replaced = {o.split("=")[0] for o in overrides} | {
        "dataset" for o in overrides if o.startswith("dataset.")
    }
    return [o for key, base in BASE.items() if key not in replaced for o in base] + overrides


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["layer=-1"], r"layer=-1 is outside smollm2-135m: valid layers are 0\.\.29"),
        (["layer=30"], r"layer=30 is outside smollm2-135m: valid layers are 0\.\.29"),
        (["seed=-1"], r"seed=-1 is not allowed; a seed must be >= 0"),
        (["model.n_ctx=1"], r"model.n_ctx=1: must be >= 2"),
        (["activations.max_length=1"], r"activations.max_length=1 >= 2"),
        (["method=snmf", "method.sparsity=0"], r"method.sparsity=0: must be in \(0, 1\]"),
        (["method=snmf", "method.sparsity=1.5"], r"method.sparsity=1.5: must be in \(0, 1\]"),
        (
            ["method=snmf_hier", "method.sparsity=-0.1"],
            r"method.sparsity=-0.1: must be in \(0, 1\]",
        ),
        (["method=snmf", "method.rank=0"], r"method.rank=0: must be >= 1"),
        (
            ["method=snmf_hier", "method.ranks=[10,20]"],
            r"method.ranks=\[10, 20\]: must be .*decreasing",
        ),
        (
            ["method=snmf", "+method.rnak=5"],
            r"(?s)method 'featbench.methods.snmf.SNMF' could not be built.*unexpected keyword argument 'rnak'",
        ),
        ([*STEERING, "task.steering.kl_targets=[0.1,-0.2]"], r"task.steering.kl_targets=.*must be"),
        ([*STEERING, "task.steering.kl_targets=[0]"], r"task.steering.kl_targets=\[0\].*must be"),
        ([*STEERING, "task.steering.kl_targets=[]"], r"task.steering.kl_targets=\[\].*must be"),
        ([*STEERING, "task.steering.prompts=[]"], r"task.steering.prompts=\[\].*must be"),
        ([*STEERING, "task.steering.max_features=0"], r"task.steering.max_features=0.*must be"),
        ([*STEERING, "task.steering.max_features=-3"], r"task.steering.max_features=-3.*must be"),
        ([*STEERING, "judge=none"], r"task steering needs a judge; choose judge="),
        (
            ["task=[synthetic_recovery]", "task.synthetic_recovery.sparsity=0"],
            r"task.synthetic_recovery.sparsity=0.* is out of range",
        ),
        (
            ["task=[concept_detection]", "task.concept_detection.coverage_threshold=1.5"],
            r"task.concept_detection.coverage_threshold=1.5: must be in \[0, 1\]",
        ),
        (
            ["task=[reconstruction]", "task.reconstruction.max_sentences=0"],
            r"task.reconstruction.max_sentences=0: must be >= 1 or null",
        ),
        (["dataset.test_fraction=1.5"], r"test_fraction=1.5: must be in \[0, 1\)"),
        (
            ["dataset.test_fraction=0"],
            r"task concept_detection scores held-out sentences .* no test split",
        ),
        (["dataset.max_per_concept=2"], r"dataset.max_per_concept=2: must be >= 4"),
        (["dataset.concepts=[food]"], r"method diffmean needs at least two concepts.*\['food'\]"),
        (
            ["judge_failure_limit=1.5"],
            r"judge_failure_limit=1.5 is not allowed; a fraction in \[0, 1\]",
        ),
        # a rank above the hook's width (the model config's) or above the train tokens (at
        # most one per UTF-8 byte, plus BOS: 9 short train sentences here)
        (
            ["method=snmf", "method.rank=1600", "hook=mlp_post", "dataset.max_per_concept=40"],
            r"rank 1600 exceeds the mlp_post width of smollm2-135m \(1536\)",
        ),
        (
            ["method=pca", "method.n_features=600", "hook=mlp_out", "dataset.max_per_concept=40"],
            r"rank 600 exceeds the mlp_out width of smollm2-135m \(576\)",
        ),
        (
            ["method=snmf_hier", "method.ranks=[1500,10]", "hook=mlp_post"],
            r"rank 1500 exceeds the train split's tokens \(at most \d+\)",
        ),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_bad_value_is_named_before_the_model_loads(overrides, message, no_expensive_work, tmp_path):
    cfg = _compose(_with_base(overrides))
    with pytest.raises(FeatbenchError, match=message):
        bench.job.run.run_job(cfg, tmp_path / "job")
    assert not list(tmp_path.rglob("metrics.parquet"))


def test_a_misspelled_task_target_is_an_error_not_dropped(no_expensive_work, tmp_path):
    """Settings of an unselected task are ignored; a task node whose `_target_` is
    misspelled would be dropped the same way, so it is refused, naming the key."""
    cfg = _compose(_with_base(["+task.extra._taget_=featbench.tasks.steering.Steering"]))
    with pytest.raises(ConfigError, match=r"task.extra has no _target_ but has '_taget_'"):
        bench.job.run.run_job(cfg, tmp_path / "job")
    leftover = _compose(_with_base(["experiment=smoke", "task=[concept_detection]"]))
    assert "_target_" not in leftover.task.steering  # smoke's steering settings: still ignored
    assert "kl_targets" in leftover.task.steering


def test_one_concept_with_an_unsupervised_method_fails_before_the_model_loads(
    no_expensive_work, tmp_path
):
    cfg = _compose(_with_base(["method=random", "dataset.concepts=[food]"]))
    with pytest.raises(
        ConfigError, match=r"task concept_detection needs at least 2 concepts.*\['food'\]"
    ):
        bench.job.run.run_job(cfg, tmp_path / "job")


# -- rank larger than the tokens or the width: at fit, before any iteration --------------------

WIDE = torch.randn(30, 60, generator=torch.Generator().manual_seed(0))  # 30 tokens x 60 wide


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (
            SNMF(rank=50),
            r"method.rank=50 exceeds min\(tokens, width\) = min\(30, 60\); choose rank <= 30",
        ),
        (
            HierarchicalSNMF(ranks=[50, 10]),
            r"method.ranks=\[50, 10\]: the finest rank 50 exceeds min\(tokens, width\) = min\(30, 60\)",
        ),
        (PCA(n_features=40), r"method.n_features=40: must be in 1..30"),
        (Neurons(n_features=61), r"method.n_features=61: must be in 1..60"),
        (RandomDirections(n_features=0), r"method.n_features=0: must be >= 1"),
    ],
    ids=lambda value: getattr(value, "name", None),
)
def test_rank_beyond_tokens_or_width_names_rank_and_limits(method, message, monkeypatch):
    def no_init(*args, **kwargs):
        raise AssertionError("SNMF started initializing before checking the rank")

    monkeypatch.setattr(SNMF, "_init", no_init)
    with pytest.raises(ConfigError, match=message):
        method.fit(_acts(WIDE))


# -- data --------------------------------------------------------------------------------------


def test_diffmean_with_one_label_names_what_it_got():
    with pytest.raises(ConfigError, match=r"DiffMean needs tokens of at least two labels.*\['a'\]"):
        DiffMean().fit(_acts(torch.randn(20, 8), ["a"] * 4))


def _dataset(labels: list[str]) -> ConceptDataset:
    splits = tuple("test" if i % 3 == 0 else "train" for i in range(len(labels)))
    sentences = tuple(f"sentence {i}" for i in range(len(labels)))
    return ConceptDataset(sentences, tuple(labels), splits, "memory")


def _task_data(dataset: ConceptDataset, acts: ActivationSet, tmp_path: Path) -> TaskData:
    return TaskData(dataset=dataset, activations=acts, seed=0, output_dir=tmp_path)


def test_concept_detection_with_one_concept_names_what_it_got(tmp_path):
    labels = _labels(12, ("a", NEUTRAL))
    acts = _acts(torch.randn(60, 8), labels)
    features = RandomDirections(n_features=3).fit(acts)
    with pytest.raises(ConfigError, match=r"needs at least 2 concepts besides neutral.*\['a'\]"):
        ConceptDetection().evaluate(
            None, features, _task_data(_dataset(labels), acts, tmp_path), None
        )


def test_truncated_sentences_are_counted_on_the_activations(
    tiny_model, monkeypatch, tmp_path, caplog
):
    monkeypatch.setenv("FEATBENCH_CACHE", str(tmp_path))
    data = ConceptDataset(
        (" ".join(["word"] * 300), "short one", "another short one"),
        ("a", "a", "a"),
        ("train",) * 3,
        "memory",
    )
    for _ in range(2):  # a fresh extraction, then a cache hit: the count is there both times
        acts = extract(
            tiny_model, data, 0, "mlp_post", model_fingerprint="tiny-trunc", max_length=40
        )
        assert acts.meta["truncated_sentences"] == 1
        assert int((acts.sentence_ids == 0).sum()) == 39  # 40 tokens, BOS dropped
    assert "1 of 3 sentences were longer than 40 tokens and were truncated" in caplog.text


MULTILINGUAL = (
    "Der Bäcker öffnet früh am Morgen seine Tür 🥐.",
    "東京の天気は今日とても良いです。",
    "Погода в Москве сегодня холодная и ветреная.",
    "الطقس جميل جدا اليوم في المدينة",
    "🎉🎉 Party time! 🥳🔥 with emoji only 🙂",
    "Ελληνικά γράμματα και μαθηματικά σύμβολα ∑ ∫ √",
)


def test_non_english_and_emoji_text_extracts_and_decodes(tiny_model):
    data = ConceptDataset(
        MULTILINGUAL, ("a",) * len(MULTILINGUAL), ("train",) * len(MULTILINGUAL), "m"
    )
    acts = extract(tiny_model, data, 1, "mlp_post", model_fingerprint="tiny-utf8", use_cache=False)
    assert torch.isfinite(acts.acts).all()
    assert set(acts.sentence_ids.tolist()) == set(range(len(MULTILINGUAL)))
    tokenizer = tiny_model.tokenizer
    for i, sentence in enumerate(MULTILINGUAL):
        ids = acts.token_ids[acts.sentence_ids == i].tolist()
        assert tokenizer.decode(ids).strip() == sentence  # byte-level: nothing lost


@pytest.mark.integration
def test_non_english_and_emoji_dataset_runs_on_the_embedded_model(embedded, tmp_path):
    from bench.data import datasets
    from bench.fit.contexts import top_contexts

    rows = [
        {"prompt": text, "label": "emoji" if "🙂" in text or "🎉" in text else "world"}
        for text in MULTILINGUAL
    ]
    rows += [
        {"prompt": f"{emoji} {word}", "label": "emoji"}
        for emoji, word in [("😀", "smile"), ("🚀", "launch"), ("🌧️", "rain")]
    ]
    rows += [
        {"prompt": f"Plain sentence number {n} in English.", "label": NEUTRAL} for n in range(4)
    ]
    file = tmp_path / "utf8.jsonl"
    file.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    data = datasets.load(str(file))
    assert data.concepts == ["emoji", "world"]
    acts = extract(embedded.model, data, 3, "mlp_post", model_fingerprint=embedded.fingerprint)
    assert torch.isfinite(acts.acts).all() and acts.meta["truncated_sentences"] == 0
    features = DiffMean().fit(acts.subset(data.indices("train")))
    rows = ConceptDetection().evaluate(
        embedded.model, features, _task_data(data, acts, tmp_path), None
    )
    aurocs = [r["value"] for r in rows if r["metric"] == "auroc"]
    assert aurocs and all(0.0 <= v <= 1.0 for v in aurocs)
    contexts = top_contexts(features, acts, embedded.model.tokenizer)
    texts = " ".join(c["context"] for per_feature in contexts for c in per_feature)
    assert any(ch in texts for ch in "🙂🎉😀🚀") or any(ch in texts for ch in "東Мال")


# -- numerics ----------------------------------------------------------------------------------


def _finite_numbers(obj) -> bool:
    """Every float inside a nested info dict is finite (no silent NaN)."""
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite_numbers(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return all(_finite_numbers(v) for v in obj)
    return True


ZERO_METHODS = [
    SNMF(rank=4, max_iter=20, device="cpu"),
    HierarchicalSNMF(ranks=[4, 2], max_iter=20, device="cpu"),
    PCA(n_features=4),
    Neurons(n_features=4),
    RandomDirections(n_features=4),
    DiffMean(),
    TopKSAE(d_sae=8, k=2, epochs=1.0, device="cpu"),
]


@pytest.mark.parametrize("method", ZERO_METHODS, ids=lambda m: m.name)
def test_all_zero_activations_give_a_clear_error_or_finite_features(method, caplog):
    acts = _acts(torch.zeros(60, 16), _labels(12))
    try:
        features = method.fit(acts)
    except ConfigError as err:  # a clear refusal naming the hook
        assert HOOK in str(err) and ("zero" in str(err) or "same mean" in str(err)), str(err)
        return
    assert torch.isfinite(features.directions).all()
    assert torch.isfinite(features.encode(acts)).all()
    assert _finite_numbers(features.info), features.info
    if "empty_features" in features.info:  # SNMF: nothing to factorize, every feature empty
        assert features.info["empty_features"] == list(range(len(features)))
        assert "features are empty (all-zero)" in caplog.text


def test_snmf_empty_features_are_reported_not_nan(caplog):
    z = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    z[:, 1] = 0.0  # a feature that winner-take-all and the updates emptied
    with caplog.at_level(logging.WARNING):
        features = make_features(z, "snmf", HOOK, {})
    assert features.info["empty_features"] == [1]
    assert "1 of 3 features are empty (all-zero)" in caplog.text
    assert torch.isfinite(features.directions).all() and features.directions[1].abs().sum() == 0
    codes = features.encode(torch.randn(10, 16))
    assert torch.isfinite(codes).all() and torch.isfinite(features.decode(codes)).all()


def test_concept_detection_on_empty_features_counts_them_dead(tmp_path):
    labels = _labels(12)
    acts = _acts(torch.zeros(60, 16), labels)
    features = SNMF(rank=3, max_iter=5, device="cpu").fit(acts)
    rows = ConceptDetection().evaluate(
        None, features, _task_data(_dataset(labels), acts, tmp_path), None
    )
    summary = {r["metric"]: r["value"] for r in rows if "feature" not in r and "concept" not in r}
    assert summary["dead_features"] == 3 and summary["mean_feature_auroc"] == 0.5
    assert all(r["reason"] for r in rows if r["metric"] == "s_cd")  # missing with a reason
    assert all(r["value"] is None or math.isfinite(r["value"]) for r in rows)


def test_a_model_sizes_its_default_comparison_and_an_override_wins():
    """Gemma 3's tokens cost ~2.5x SmolLM2's, so its model config caps the reconstruction
    sentences of the default comparison; the task's own settings still override it."""
    smol, gemma = _compose([]), _compose(["model=gemma3-270m"])
    assert (smol.task.steering.concepts, smol.task.reconstruction.max_sentences) == (8, None)
    assert (gemma.task.steering.concepts, gemma.task.reconstruction.max_sentences) == (8, 250)
    more = _compose(["model=gemma3-270m", "task.steering.concepts=6"])
    assert more.task.steering.concepts == 6
    full = _compose(["experiment=compare_full"])
    assert full.task.steering.concepts is None and "steering_feature" in full.task


# --- the plugin path a newcomer walks (issue 25) -----------------------------------------


@pytest.mark.parametrize("shape", [(16, 4), (4, 4), (0, 16)])
def test_directions_of_the_wrong_shape_are_named_right_after_the_fit(shape):
    """A d x k or k x k matrix used to pass the fit and fail later as a raw torch error."""
    from bench.fit.checks import check_fitted
    from featbench.methods.base import Features

    acts = ActivationSet(
        torch.zeros(3, 16),
        torch.zeros(3, dtype=torch.long),
        torch.zeros(3, dtype=torch.long),
        torch.arange(3),
        "blocks.0.mlp.hook_post",
    )
    features = Features(torch.zeros(shape), method="ica", hook=acts.hook)
    with pytest.raises(
        ConfigError,
        match=rf"method ica: fit returned directions of shape "
        rf"\({shape[0]}, {shape[1]}\); expected k x 16",
    ):
        check_fitted("ica", features, acts)
    check_fitted("ica", Features(torch.zeros(4, 16), method="ica", hook=acts.hook), acts)


def test_a_target_that_cannot_be_built_says_why(tmp_path, monkeypatch):
    """Whether the module is missing, fails to import, or lacks the attribute; never the
    HYDRA_FULL_ERROR hint, which shows nothing more here."""
    from omegaconf import OmegaConf

    from bench.fit.method import Method
    from bench.job.plugins import build

    (tmp_path / "broken_plugin.py").write_text("import a_module_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for target, message in [
        (
            "nowhere.Method",
            "module 'nowhere' not found. A plugin outside featbench must be "
            "importable: installed, or its folder on PYTHONPATH",
        ),
        (
            "featbench.methods.snmf.NoSuch",
            "module 'featbench.methods.snmf' has no attribute 'NoSuch'",
        ),
        ("broken_plugin.Method", "importing module 'broken_plugin' failed: ModuleNotFoundError"),
    ]:
        with pytest.raises(ConfigError) as info:
            build(OmegaConf.create({"_target_": target}), "method", Method)
        assert message in str(info.value) and "HYDRA_FULL_ERROR" not in str(info.value)
        assert f"method {target!r} could not be built" in str(info.value)
