"""Fast checks of the steering task's parts on a tiny random model: which texts are
generated and judged with which description, checkpoints, and the search, sampling
and generation mechanics; aggregation is in test_steering_scores.py and the real path
in test_steering.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.errors import ConfigError
from bench.judges.base import Judge, Judgement
from bench.tasks.checkpoints import Checkpoints
from bench.tasks.descriptions import Describer, Description, top_tokens, vocab_projection
from bench.tasks.steering.calibrate import calibrate, search_alpha
from bench.tasks.steering.generate import generate
from bench.tasks.steering.kl import next_token_kl
from bench.tasks.steering.sampling import sample_next
from bench.tasks.steering.scores import EMPTY, ZERO_NORM
from featbench.methods.base import ActivationSet, Features
from featbench.tasks.steering import Steering

HOOK = "blocks.1.mlp.hook_post"
TOKENS = Description("tokens", {1: "food, pizza"})


# --- what is generated and judged, with which description --------------------------


class _Recorder(Judge):
    name = "recorder"
    can_write = True

    def __init__(self, concept=1.0, write=None) -> None:
        self.concept_calls, self.fluency_calls, self.kinds = [], [], []
        self.score, self.write = concept, write

    def concept(self, texts, description, baseline, kind=None, examples=None):
        self.concept_calls.append((list(texts), description))
        self.kinds.append(kind)
        return [
            Judgement(self.score) if self.score is not None else Judgement(None, "down")
            for _ in texts
        ]

    def fluency(self, texts, prompt):
        self.fluency_calls.append(list(texts))
        return [Judgement(2.0) for _ in texts]

    def describe(self, contexts):
        return self.write


def _task(**kw) -> Steering:
    return Steering(
        kl_targets=[0.01, 0.05],
        samples=2,
        max_new_tokens=4,
        search_points=16,
        baseline_samples=1,
        **kw,
    )


def _direction(d: int) -> torch.Tensor:
    return torch.nn.functional.normalize(
        torch.randn(d, generator=torch.Generator().manual_seed(0)), dim=0
    )


def test_input_centric_descriptions_steer_and_judge_the_positive_sign_only(tiny_model, monkeypatch):
    import featbench.tasks.steering as steering

    searched, generated = [], []

    def search(*args, **kwargs):
        found, passes = calibrate(*args, **kwargs)
        searched.extend(found)
        return found, passes

    def gen(model, hook, specs, task):
        generated.extend(specs)
        return generate(model, hook, specs, task)

    monkeypatch.setattr(steering, "calibrate", search)
    monkeypatch.setattr(steering, "generate", gen)
    task, judge = _task(), _Recorder()
    direction = _direction(tiny_model.cfg.d_mlp)
    result = task._steer_feature(tiny_model, HOOK, 0, direction, 1.0, TOKENS, [], judge, 0)
    # No negative search, generation or row at all (half the cost of both signs).
    assert sorted(searched) == [(0, 1), (1, 1)]
    assert len(generated) == 2 * 2 and all(float(row.vector @ direction) > 0 for row in generated)
    assert {r["sign"] for r in result["rows"]} == {1}
    samples = [r for r in result["rows"] if r.get("sample") is not None]
    assert len(samples) == 3 * 2 * 2  # 3 metrics x 2 targets x 2 samples
    assert [desc for _, desc in judge.concept_calls] == ["food, pizza"] and judge.kinds == [
        "tokens"
    ]
    assert {r["description_text"] for r in samples} == {"food, pizza"}


def test_output_centric_judges_each_sign_against_its_own_description(tiny_model):
    task, judge = _task(), _Recorder()
    desc = Description("output_centric", {1: "up, high", -1: "down, low"})
    direction = _direction(tiny_model.cfg.d_mlp)
    result = task._steer_feature(tiny_model, HOOK, 0, direction, 1.0, desc, [], judge, 0)
    samples = [r for r in result["rows"] if r.get("sample") is not None]
    assert {r["sign"] for r in samples} == {1, -1}
    assert [d for _, d in judge.concept_calls] == ["up, high", "down, low"]
    assert judge.kinds == ["output_centric", "output_centric"]
    for sign, (texts, _) in zip((1, -1), judge.concept_calls, strict=True):
        mine = [r for r in samples if r["sign"] == sign and r["metric"] == "concept_score"]
        assert {r["description_text"] for r in mine} == {desc.texts[sign]}
        assert texts == [r["text"] for r in mine if r["text"].strip()]


def test_empty_generation_scores_zero_unjudged_and_a_zero_direction_is_not_searched(tiny_model):
    task, judge = _task(), _Recorder()
    samples = [((0, 1, 1.0, 0.01), 0, "  "), ((0, 1, 1.0, 0.01), 1, "some text")]
    rows = task._judge(5, TOKENS, 1, samples, [], judge)
    assert judge.concept_calls == [(["some text"], "food, pizza")]
    empty = [r for r in rows if r["sample"] == 0]
    assert all(r["value"] == 0.0 and r["failure"] == EMPTY for r in empty) and len(empty) == 3
    assert all(r["reason"] == "empty generation" for r in empty)
    zero = task._steer_feature(
        tiny_model, HOOK, 7, torch.zeros(tiny_model.cfg.d_mlp), 0.0, TOKENS, [], judge, 0
    )
    assert zero["passes"] == 0 and [r["failure"] for r in zero["rows"]] == [ZERO_NORM]


def test_descriptions_are_one_kind_with_the_signs_they_describe(tiny_model):
    tok = tiny_model.tokenizer
    words = [" pizza", " food", " pizza", " the", " dog"]
    ids = torch.tensor([tok.encode(w, add_special_tokens=False)[0] for w in words])
    d = tiny_model.cfg.d_mlp
    acts = torch.zeros(5, d)
    acts[:, 0] = torch.tensor([5.0, 4.0, 3.0, 1.0, 0.5])
    train = ActivationSet(acts, ids, torch.zeros(5, dtype=torch.long), torch.arange(5), HOOK)
    names = [tok.decode([int(i)]).strip() for i in ids]
    assert top_tokens(acts[:, 0], train, tok, 3) == [names[0], names[1], names[3]]
    assert top_tokens(torch.zeros(5), train, tok, 3) == []  # a code that never varies
    directions = torch.eye(d)[:2]
    features = Features(directions, method="m", hook=HOOK)
    tokens = Describer("tokens", tiny_model, features, train, _Recorder(), [0, 1], directions, 2)(0)
    assert tokens.signs == (1,) and tokens.texts[1] == f"{names[0]}, {names[1]}"
    out = Describer("output_centric", tiny_model, features, train, None, [0], directions, 3)(0)
    assert out.signs == (1, -1) and out.texts[1] != out.texts[-1]
    summary = Describer(
        "summary", tiny_model, features, train, _Recorder(write="pizza"), [0], directions, 3
    )(0)
    assert summary.texts == {1: "pizza"}
    unwritten = Describer(
        "summary", tiny_model, features, train, _Recorder(write=None), [0], directions, 3
    )(0)
    assert unwritten.texts == {} and unwritten.reason  # missing, never a silent token list


def test_summary_descriptions_need_a_judge_that_writes():
    class Silent(_Recorder):
        name, can_write = "silent", False

    with pytest.raises(ConfigError, match="description=summary needs a judge that writes"):
        Steering(protocol="feature", description="summary").check_judge(Silent())
    Steering(protocol="feature", description="summary").check_judge(_Recorder())
    Steering(description="summary").check_judge(Silent())  # the concept protocol judges labels
    Steering().check_judge(Silent())  # tokens: any judge


def test_checkpoints_of_another_format_are_not_reused(tmp_path):
    v = torch.ones(3)
    Checkpoints(tmp_path, "cfg", version="a").save(0, v, {"rows": [1]})
    assert Checkpoints(tmp_path, "cfg", version="a").load(0, v) == {"rows": [1]}
    assert Checkpoints(tmp_path, "cfg", version="b").load(0, v) is None
    assert Checkpoints(tmp_path, "other", version="a").load(0, v) is None
    assert Checkpoints(tmp_path, "cfg", version="a").load(0, 2 * v) is None


@pytest.mark.parametrize("key", ["", None])
def test_checkpoints_without_a_key_are_refused_not_silently_skipped(tmp_path, key):
    """Issue 25: the empty key (TaskData's old default) used to turn every save and load into
    a silent no-op; a steering task without a key now says that it cannot resume."""
    with pytest.raises(ValueError, match="a checkpoint key is required"):
        Checkpoints(tmp_path, key)


# --- mechanics on a tiny random model ----------------------------------------------


class _Cfg:
    temperature, top_k, top_p, max_new_tokens, batch_size = 1.0, 3, 0.5, 6, 4
    stop_at_eos, judged_text, engine = True, "continuation", "lean"


def test_sampling_respects_top_k_and_top_p():
    logits = torch.tensor([[5.0, 4.9, 0.0, -1.0], [0.0, 0.0, 0.0, 10.0]])
    for u in torch.linspace(0, 0.999, 20):
        pick = sample_next(logits, torch.full((2,), float(u), dtype=torch.float64), _Cfg)
        assert pick[0] in (0, 1)  # the nucleus of 0.5 holds the two top tokens
        assert pick[1] == 3


def test_next_token_kl_matches_an_independent_formula(tiny_model):
    direction = _direction(tiny_model.cfg.d_mlp)
    prompts = ["I think that", "Hello there, my"]

    @torch.no_grad()
    def by_hand(alpha: float) -> float:
        """KL(P_base || P_steered) of the next token, averaged over prompts."""
        total = 0.0
        for prompt in prompts:
            tokens = tiny_model.to_tokens(prompt)
            base = torch.log_softmax(tiny_model(tokens)[0, -1], -1)
            steered_logits = tiny_model.run_with_hooks(
                tokens, fwd_hooks=[(HOOK, lambda act, hook: act + alpha * direction)]
            )[0, -1]
            steered = torch.log_softmax(steered_logits, -1)
            total += float((base.exp() * (base - steered)).sum())
        return total / len(prompts)

    alphas = [0.0, 0.5, 3.0, 20.0]
    kls, passes = next_token_kl(
        tiny_model, HOOK, prompts, torch.stack([a * direction for a in alphas]), batch=3
    )
    assert passes == 2 * 2  # two prompts, two batches each
    for alpha, kl in zip(alphas, kls, strict=True):
        assert kl == pytest.approx(by_hand(alpha), abs=1e-6)
    # The search's achieved KL is that same quantity at the alpha it returns.
    task = Steering(prompts=prompts, kl_targets=[0.02, 0.1], search_points=16)
    found, _ = search_alpha(tiny_model, HOOK, direction, task, signs=(1,))
    assert sorted(found) == [(0, 1), (1, 1)]
    for (t, _), (alpha, kl, reason) in found.items():
        assert reason is None and alpha > 0 and kl == pytest.approx(by_hand(alpha), abs=1e-6)
        assert abs(kl - task.kl_targets[t]) <= task.tolerance


def test_alpha_search_hits_reachable_targets_and_explains_the_others(tiny_model):
    direction = _direction(tiny_model.cfg.d_mlp)
    task = Steering(kl_targets=[0.01, 0.05, 1e6], search_points=16)
    found, passes = search_alpha(tiny_model, HOOK, direction, task)
    for sign in (1, -1):
        for t in (0, 1):
            alpha, kl, reason = found[(t, sign)]
            assert reason is None and np.sign(alpha) == sign
            assert abs(kl - task.kl_targets[t]) <= task.tolerance
        alpha, kl, reason = found[(2, sign)]
        assert alpha is None and "not reachable" in reason
    assert passes <= 1 + task.search_rounds


def test_generation_does_not_depend_on_batching_and_honours_steering(tiny_model):
    d = tiny_model.cfg.d_mlp
    v = torch.zeros(d)
    big = 50 * torch.nn.functional.normalize(torch.randn(d), dim=0)
    specs = [("I think that", v, (1, 0, 0, 0, s)) for s in range(3)]
    specs += [("I think that", big, (1, 1, 0, 0, s)) for s in range(3)]
    specs += [("Hello", v, (1, 0, 0, 0, 9))]

    class A(_Cfg):
        batch_size = 7

    class B(_Cfg):
        batch_size = 1

    a, b = generate(tiny_model, HOOK, specs, A), generate(tiny_model, HOOK, specs, B)
    assert a == b
    assert a[:3] != a[3:6]  # same seeds, different steering: different text


def test_kv_cached_greedy_generation_matches_full_forward(tiny_model):
    class Greedy(_Cfg):
        temperature, max_new_tokens = 0.0, 5

    (text,) = generate(
        tiny_model, HOOK, [("I think", torch.zeros(tiny_model.cfg.d_mlp), (0,))], Greedy
    )
    tokens = tiny_model.to_tokens("I think")
    for _ in range(5):
        nxt = tiny_model(tokens)[0, -1].argmax()
        tokens = torch.cat([tokens, nxt.view(1, 1)], 1)
    eos = tiny_model.tokenizer.eos_token_id
    new = [t for t in tokens[0, -5:].tolist()]
    new = new[: new.index(eos)] if eos in new else new
    assert text == tiny_model.tokenizer.decode(new, skip_special_tokens=True)


def test_vocab_projection_is_the_unembedding_of_the_normed_output_direction(tiny_model):
    """Issue 25: the old test passed with W_E in place of W_U, or with the final norm's
    scale dropped (the tiny model's norm weights were all ones). Here the norm has a
    non-trivial scale and the answer is computed independently."""
    torch.manual_seed(0)
    d_model = tiny_model.cfg.d_model
    with torch.no_grad():
        tiny_model.ln_final.w.copy_(torch.linspace(0.2, 3.0, d_model))
    direction = torch.randn(tiny_model.cfg.d_mlp)
    decode = tiny_model.tokenizer.decode
    v = direction @ tiny_model.blocks[1].mlp.W_out.detach()
    ref = (v * tiny_model.ln_final.w.detach()) @ tiny_model.W_U.detach()
    expected = (
        [decode([i]) for i in ref.topk(20).indices.tolist()],
        [decode([i]) for i in (-ref).topk(20).indices.tolist()],
    )
    assert vocab_projection(tiny_model, HOOK, direction, 20) == expected
    unnormed = [decode([i]) for i in (v @ tiny_model.W_U.detach()).topk(20).indices.tolist()]
    embedded = [
        decode([i])
        for i in ((v * tiny_model.ln_final.w.detach()) @ tiny_model.W_E.detach().T)
        .topk(20)
        .indices.tolist()
    ]
    assert expected[0] != unnormed and expected[0] != embedded  # the test can tell them apart
    resid = torch.randn(d_model)  # a residual direction goes through no W_out
    out = (resid * tiny_model.ln_final.w.detach()) @ tiny_model.W_U.detach()
    up, _ = vocab_projection(tiny_model, "blocks.1.hook_resid_post", resid, 20)
    assert up == [decode([i]) for i in out.topk(20).indices.tolist()]


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"kl_targets": [0.1, -0.2]}, "kl_targets"),
        ({"kl_targets": []}, "kl_targets"),
        ({"prompts": []}, "prompts"),
        ({"max_features": 0}, "max_features"),
        ({"description": "vibes"}, "description"),
        ({"description": "input_centric:tokens"}, "description"),  # the old mix is gone
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": "sometimes"}, "top_p"),
        ({"alpha_search": "golden"}, "alpha_search"),
        ({"alpha_range": [5.0, 1.0]}, "alpha_range"),
        ({"negative_alpha": "free"}, "negative_alpha"),
        ({"judge_failure": "nan"}, "judge_failure"),
        ({"judge_attempts": 0}, "judge_attempts"),
        ({"judged_text": "all"}, "judged_text"),
        ({"description_signs": "both_ways"}, "description_signs"),
        ({"direction": "diffmean"}, "direction"),
        ({"protocol": "paperish"}, "protocol"),
    ],
)
def test_bad_settings_name_the_value_and_what_is_allowed(kwargs, key):
    with pytest.raises(ConfigError, match=f"task.steering.{key}=.*must be"):
        Steering(**kwargs)


def test_concept_units_pick_each_methods_best_train_feature(tiny_model, tmp_path):
    from bench.activations.extraction import extract
    from bench.data import datasets
    from featbench.methods.diffmean import DiffMean
    from featbench.methods.random import RandomDirections as Random
    from featbench.tasks.base import TaskData

    data = datasets.load(concepts=["food", "music", "french"], max_per_concept=8, max_neutral=4)
    acts = extract(tiny_model, data, 1, "mlp_post", model_fingerprint="tiny-cp", use_cache=False)
    train = acts.subset(data.indices("train"))
    task_data = TaskData(dataset=data, activations=acts, seed=0, output_dir=tmp_path)
    task = Steering(protocol="concept", concepts=2, concept_seed=3)
    units, feature_of, describe, extra = task._concept_units(DiffMean().fit(train), task_data)
    again, *_ = Steering(protocol="concept", concepts=2, concept_seed=3)._concept_units(
        Random(n_features=10).fit(train), task_data
    )
    assert len(units) == 2 and units == again  # the same concepts for every method
    diffmean = DiffMean().fit(train)
    for c in units:  # a supervised method steers its own direction for the concept
        assert diffmean.labels[feature_of[c]] == c  # ("supervised" is the job's column now)
        assert describe(c).kind == "label" and describe(c).texts == {1: c.replace("_", " ")}
    random = Random(n_features=10).fit(train)
    _, picked, _, info = task._concept_units(random, task_data)
    from bench.tasks.detection import auroc_matrix
    from featbench.tasks.concept_detection import sentence_scores

    scores = sentence_scores(random, task_data)[data.indices("train")]
    labels = np.array(data.labels)[data.indices("train")]
    auc = auroc_matrix(scores, labels[:, None] == np.array(data.concepts)[None, :])
    for c in units:  # the unsupervised pick is the best train-split AUROC
        assert picked[c] == int(auc[data.concepts.index(c)].argmax())
        assert info[c]["match_auroc"] == pytest.approx(auc[data.concepts.index(c)].max())


def test_the_steering_yaml_says_what_its_one_declaration_says():
    """Issue 25: the settings are declared once, in SteeringSettings; conf/task/steering.yaml
    repeats them for the command line, key for key and default for default, and `protocol`
    is the one value that means "the protocol's"."""
    import dataclasses

    import yaml

    from bench.tasks.steering.settings import PROTOCOL_VALUES, SteeringSettings
    from tests.conftest import REPO

    node = yaml.safe_load((REPO / "conf/task/steering.yaml").read_text())
    node.pop("_target_")
    fields = {f.name: f for f in dataclasses.fields(SteeringSettings)}
    assert set(node) == set(fields)
    for name, f in fields.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if name == "concepts":  # the model sizes it: ${model.steering_concepts}
            assert node[name] == "${model.steering_concepts}"
            continue
        assert node[name] == default, name
    assert {k for k, v in node.items() if v == "protocol"} == set(PROTOCOL_VALUES)
    resolved = SteeringSettings()
    assert all(getattr(resolved, key) != "protocol" for key in PROTOCOL_VALUES)
