"""Fast checks of the steering task's parts on a tiny random model (shapes,
bookkeeping, search and sampling logic); the real path is in test_steering.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.errors import ConfigError
from bench.judges.base import Judgement, parse_rating
from bench.steer import generate, next_token_kl, sample_next, search_alpha
from tasks.steering import (
    Steering,
    _select,
    bootstrap_mean,
    select_features,
    steering_score,
    vocab_projection,
)

HOOK = "blocks.1.mlp.hook_post"


def test_steering_score_is_the_harmonic_mean_with_zero_and_missing_rules():
    assert steering_score(2.0, 2.0) == 2.0
    assert steering_score(1.0, 2.0) == pytest.approx(4 / 3)
    assert steering_score(0.0, 2.0) == 0.0
    assert steering_score(None, 2.0) is None
    assert steering_score(2.0, None) is None


def test_rating_parser_reads_the_last_rating_and_never_invents_a_zero():
    assert parse_rating("fine. Rating: [[2]]").score == 2.0
    assert parse_rating("Rating: [[0]] no wait Rating: [[1]]").score == 1.0
    missing = parse_rating("Rating: **[2]**")
    assert missing.score is None and "unparsable" in missing.reason
    with pytest.raises(ValueError):
        Judgement(None)  # a missing value must say why


def test_feature_selection_is_seeded_sorted_and_complete_when_few():
    assert select_features(3, 10, seed=1) == [0, 1, 2]
    a = select_features(100, 5, seed=7)
    assert a == select_features(100, 5, seed=7) and a == sorted(a) and len(set(a)) == 5
    assert a != select_features(100, 5, seed=8)


def test_selection_picks_on_one_half_and_reports_the_other():
    scores = {  # (kl_target, sign) -> {sample: score}
        (0.1, 1): {0: 2.0, 1: 0.0, 2: 2.0, 3: 0.0},  # great on even samples only
        (0.2, 1): {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0},
    }
    best = _select(scores, lambda s: True, lambda s: True)
    assert best[0] == 1.0 and best[1] in scores  # tie of means 1.0: the smaller KL wins
    held = _select(scores, lambda s: s % 2 == 0, lambda s: s % 2 == 1)
    assert held[1] == (0.1, 1) and held[0] == 0.0  # selection bias exposed
    assert _select({(0.1, 1): {0: None}}, lambda s: True, lambda s: True)[0] is None


def test_bootstrap_interval_brackets_the_mean():
    rng = np.random.default_rng(0)
    mean, low, high = bootstrap_mean([0.0, 1.0, 2.0, 1.0], 500, rng)
    assert low <= mean <= high and mean == 1.0
    assert bootstrap_mean([], 10, rng) == (None, None, None)


class _Cfg:
    temperature, top_k, top_p, max_new_tokens, batch_size = 1.0, 3, 0.5, 6, 4


def test_sampling_respects_top_k_and_top_p():
    logits = torch.tensor([[5.0, 4.9, 0.0, -1.0], [0.0, 0.0, 0.0, 10.0]])
    for u in torch.linspace(0, 0.999, 20):
        pick = sample_next(logits, torch.full((2,), float(u), dtype=torch.float64), _Cfg)
        assert pick[0] in (0, 1)  # the nucleus of 0.5 holds the two top tokens
        assert pick[1] == 3


def test_kl_is_zero_without_steering_and_grows_with_alpha(tiny_model):
    d = tiny_model.cfg.d_mlp
    direction = torch.nn.functional.normalize(torch.randn(d), dim=0)
    vectors = torch.stack([a * direction for a in (0.0, 1.0, 10.0, 100.0)])
    kls, passes = next_token_kl(tiny_model, HOOK, ["I think that"], vectors, batch=2)
    assert passes == 2 and abs(kls[0]) < 1e-5
    assert kls[1] < kls[2] < kls[3]


def test_alpha_search_hits_reachable_targets_and_explains_the_others(tiny_model):
    d = tiny_model.cfg.d_mlp
    direction = torch.nn.functional.normalize(
        torch.randn(d, generator=torch.Generator().manual_seed(0)), dim=0
    )
    task = Steering(kl_targets=[0.01, 0.05, 1e6], search_points=16)
    found, passes = search_alpha(tiny_model, HOOK, direction, task)
    for sign in (1, -1):
        for t in (0, 1):
            alpha, kl, reason = found[(t, sign)]
            assert reason is None and np.sign(alpha) == sign
            assert abs(kl - task.kl_targets[t]) <= task.tolerance
            check, _ = next_token_kl(tiny_model, HOOK, task.prompts, (alpha * direction)[None], 1)
            assert check[0] == pytest.approx(kl, abs=1e-5)
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


def test_vocab_projection_gives_distinct_tokens_per_sign(tiny_model):
    up, down = vocab_projection(tiny_model, HOOK, torch.randn(tiny_model.cfg.d_mlp), 5)
    assert len(up) == len(down) == 5 and set(up) != set(down)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"kl_targets": [0.1, -0.2]}, "kl_targets"),
        ({"kl_targets": []}, "kl_targets"),
        ({"prompts": []}, "prompts"),
        ({"max_features": 0}, "max_features"),
        ({"description": "vibes"}, "description"),
        ({"top_p": 0.0}, "top_p"),
    ],
)
def test_bad_settings_name_the_value_and_what_is_allowed(kwargs, key):
    with pytest.raises(ConfigError, match=f"task.steering.{key}=.*must be"):
        Steering(**kwargs)
