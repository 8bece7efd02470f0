"""The paper protocol's mechanics, each against an independent computation: TransformerLens's
top-k-only sampler, the reference's bisection written out again, the judge's attempts and
failure policies, TRASH exclusion, Gemma's post-MLP-norm mapping, the presets and the rating
format. The generated-sentence protocols' wiring is in tests/test_paper_wiring.py.
Models are tiny and random: bookkeeping, not evidence."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from bench.errors import ConfigError
from bench.judges.base import Judge, Judgement
from bench.tasks.descriptions import Description, written_output
from bench.tasks.steering.calibrate import calibrate
from bench.tasks.steering.generate import generate, mlp_out_image, post_norm_targets
from bench.tasks.steering.sampling import next_token_probs, sample_next
from bench.tasks.steering.scores import EXCLUDED, aggregate
from featbench.methods.base import Features
from featbench.tasks.concept_detection import ConceptDetection
from featbench.tasks.steering import Steering
from tests.openai_double import answering, double_judge, serving

HOOK = "blocks.1.mlp.hook_post"


class _Sampling:
    temperature, top_k, top_p = 1.0, 30, None


# --- (a) sampling: TransformerLens's top-k rule -------------------------------------


def test_top_k_only_is_transformer_lens_sample_logits():
    """Probabilities equal TL's masking rule (ties at the k-th value kept), and many draws of
    ours and of TL's own sample_logits both fit them (chi-square)."""
    from transformer_lens.utils import sample_logits

    torch.manual_seed(0)
    logits = torch.randn(1, 60) * 2
    order = logits[0].argsort(descending=True)
    logits[0, order[30]] = logits[0, order[29]]  # a tie at the 30th value: both kept
    settings = _Sampling()
    settings.temperature = 0.7
    probs = next_token_probs(logits, settings)[0]
    scaled = logits[0] / 0.7
    kept = scaled >= scaled.sort(descending=True).values[29]
    expected = torch.where(kept, scaled.double().exp(), torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(probs, expected / expected.sum())
    assert int((probs > 0).sum()) == 31
    n = 40_000
    ours = sample_next(
        logits.expand(n, -1),
        torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
        settings,
    )
    with torch.random.fork_rng():
        torch.manual_seed(2)
        theirs = sample_logits(logits.expand(n, -1).clone(), top_k=30, top_p=0.3, temperature=0.7)
    support = probs > 0
    for draws in (ours, theirs):
        counts = torch.bincount(draws, minlength=60).double()
        assert counts[~support].sum() == 0
        assert chisquare(counts[support].numpy(), (n * probs[support]).numpy()).pvalue > 1e-3


def test_featbench_nucleus_differs_and_stops_at_eos_only_when_asked(tiny_model):
    class Nucleus(_Sampling):
        top_p = 0.3

    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.0]])
    assert int((next_token_probs(logits, Nucleus)[0] > 0).sum()) < 5  # a nucleus inside the top k
    assert int((next_token_probs(logits, _Sampling)[0] > 0).sum()) == 5

    class Paper(_Sampling):
        max_new_tokens, batch_size, engine = 12, 4, "lean"
        stop_at_eos, judged_text = False, "bos_prompt_continuation"

    d = tiny_model.cfg.d_mlp
    specs = [("I think that", torch.zeros(d), (0, s)) for s in range(3)]
    counted: dict = {}
    texts = generate(tiny_model, HOOK, specs, Paper, counted)
    assert counted["tokens"] == 3 * 12  # every row runs its 12 steps, EOS or not
    for text in texts:  # the BOS string, the prompt, then the sampled tokens
        assert text.startswith(tiny_model.tokenizer.bos_token + "I think that")


# --- (b) the reference's bisection, written out again ----------------------------------


def _reference_bisection(model, direction, targets, prompt="I think that"):
    """The spec's pseudo-code, one forward pass per step, KL(P_base || P_steered) at the
    prompt's last position: {target: last in-tolerance mid}; unreached targets absent."""

    @torch.no_grad()
    def kl(alpha):
        tokens = model.to_tokens(prompt)
        base = torch.log_softmax(model(tokens)[0, -1].float(), -1)
        steered = model.run_with_hooks(
            tokens, fwd_hooks=[(HOOK, lambda a, hook: a + alpha * direction)]
        )
        q = torch.log_softmax(steered[0, -1].float(), -1)
        return float((base.exp() * (base - q)).sum())

    results = {}
    for target in targets:
        low, high = 1, 2000
        for _ in range(20):
            mid = (low + high) / 2.0
            value = kl(mid)
            if abs(value - target) < 0.01:
                results[target] = mid
            if value < target:
                low = mid
            else:
                high = mid
    return results


def test_bisection_gives_the_reference_alphas_and_counts_the_unreached(tiny_model):
    direction = torch.nn.functional.normalize(
        torch.randn(tiny_model.cfg.d_mlp, generator=torch.Generator().manual_seed(3)), dim=0
    )
    direction = direction * 0.02  # tiny model: keep KL(alpha in [1, 2000]) spanning the targets
    targets = [0.025, 0.05, 0.1, 0.15, 0.25, 0.35, 0.5, 1e6]
    task = Steering(protocol="paper", kl_targets=targets, prompts=["I think that"])
    expected = _reference_bisection(tiny_model, direction, targets)
    assert 3 <= len(expected) < len(targets)  # some targets reached, the last one never
    found, passes = calibrate(tiny_model, HOOK, direction, task, signs=(1, -1))
    assert passes == 20 + 1  # 20 batched steps, one pass for the mirrored sign
    for t, target in enumerate(targets):
        alpha, kl, reason = found[(t, 1)]
        assert alpha == expected.get(target), (target, alpha, expected.get(target))
        neg = found[(t, -1)]
        if alpha is None:  # dropped for both signs, with a reason (never silent)
            assert "not within tolerance" in reason and neg[0] is None and "mirrors" in neg[2]
        else:  # -alpha, not calibrated, its KL measured
            assert abs(kl - target) < 0.01 and neg[0] == -alpha and neg[1] is not None


# --- (d) the judge: attempts and failure policies -------------------------------------


def test_a_retry_is_a_new_request_and_a_rerun_replays_both_from_the_cache(tmp_path):
    seen: dict[str, int] = {}

    def first_unparsable(n, prompt, body):
        seen[prompt] = seen.get(prompt, 0) + 1
        return "Rating: **2**" if seen[prompt] == 1 else "Fine. Rating: [[2]]"

    with serving(answering(first_unparsable)) as server:

        def judge(**kw):
            return double_judge(server, tmp_path / "cache", **kw)

        once = judge().concept(["some text"], "food", [])
        assert once[0].score is None and len(server.requests) == 1
        twice = judge().with_policy(2)
        (judged,) = twice.concept(["some text"], "food", [])
        assert judged.score == 2.0  # attempt 2 asked the server, not the cached attempt 1
        assert len(server.requests) == 2 and twice.stats()["reasked"] == 1
        assert len(list((tmp_path / "cache").rglob("*.json"))) == 2  # one entry per attempt
        rerun = judge().with_policy(2)
        assert rerun.concept(["some text"], "food", []) == [judged]
        assert len(server.requests) == 2 and rerun.stats()["cache_hits"] == 2


class _Failing(Judge):
    """Concept judgements fail (missing), fluency is 2."""

    name = "failing"

    def concept(self, texts, description, baseline, kind=None, examples=None):
        return [Judgement(None, "unparsable judge answer: 'no'") for _ in texts]

    def fluency(self, texts, prompt):
        return [Judgement(2.0) for _ in texts]


@pytest.mark.parametrize("policy, value", [("missing", None), ("zero", 0.0)])
def test_judge_failure_policy_scores_missing_or_zero_and_counts_either_way(policy, value):
    task = Steering(protocol="feature", judge_failure=policy, samples=2, kl_targets=[0.1])
    desc = Description("tokens", {1: "food"})
    samples = [((0, 1, 2.0, 0.1), s, f"text {s}") for s in range(2)]
    rows = task._judge(0, desc, 1, samples, [], _Failing())
    concept = [r for r in rows if r["metric"] == "concept_score"]
    steering = [r for r in rows if r["metric"] == "steering_score"]
    assert all(r["value"] == value and r["judge_failed"] for r in concept + steering)
    assert all("unparsable" in r["reason"] for r in concept)
    assert all(("judge_failure=zero" in r["reason"]) == (policy == "zero") for r in concept)
    out = aggregate(rows, [0], seed=0, n_resamples=20)
    failures = next(r for r in out if r["metric"] == "judge_failures")
    assert failures["value"] == 2 and failures["n"] == 4  # 2 concept failures of 4 judgements


# --- (e) TRASH --------------------------------------------------------------------


class _Writer(Judge):
    """Writes an output-centric description for the + sign and TRASH for the - sign."""

    name, can_write = "writer", True

    def __init__(self):
        self.calls = 0

    def write(self, prompt, max_tokens, attempt=1):
        self.calls += 1
        return "Analysis: x\nResults:\n- Connection: " + (
            "up words" if self.calls == 1 else "TRASH"
        )

    def concept(self, texts, description, baseline, kind=None, examples=None):
        return [Judgement(1.0) for _ in texts]

    def fluency(self, texts, prompt):
        return [Judgement(2.0) for _ in texts]


def test_a_trash_sign_is_excluded_with_its_reason_and_counted(tiny_model):
    direction = torch.nn.functional.normalize(torch.randn(tiny_model.cfg.d_mlp), dim=0)
    judge = _Writer()
    desc = written_output(judge, tiny_model, HOOK, direction, 25, None)
    assert desc.texts == {1: "up words"} and "TRASH" in desc.excluded[-1]
    task = Steering(
        protocol="paper",
        kl_targets=[0.05],
        samples=2,
        max_new_tokens=3,
        description="output_summary",
        alpha_range=[0.01, 50.0],
    )
    result = task._steer_feature(tiny_model, HOOK, 0, direction, 1.0, desc, [], judge, 0)
    excluded = [r for r in result["rows"] if r.get("failure") == EXCLUDED]
    assert [(r["sign"], r["value"]) for r in excluded] == [(-1, None)]
    assert {r["sign"] for r in result["rows"] if r.get("sample") is not None} <= {1}
    out = aggregate(result["rows"], [0], seed=0, n_resamples=20)
    assert next(r for r in out if r["metric"] == "excluded_descriptions")["value"] == 1


# --- Gemma's post-MLP norm -----------------------------------------------------------


def test_post_norm_mapping_is_ln2_post_of_the_mlp_output(tiny_model):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        d_head=4,
        n_heads=4,
        d_mlp=24,
        d_vocab=tiny_model.cfg.d_vocab,
        n_ctx=32,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        final_rms=True,
        eps=1e-6,
        use_normalization_before_and_after=True,
        seed=0,
    )
    model = HookedTransformer(cfg, tiny_model.tokenizer).eval()
    with torch.no_grad():
        model.blocks[1].ln2_post.w.copy_(1 + torch.randn(16))
        model.blocks[1].mlp.b_out.copy_(torch.randn(16))
    z = torch.randn(24)
    block = model.blocks[1]
    out = block.mlp.b_out + z @ block.mlp.W_out
    by_hand = out / (out.pow(2).mean() + 1e-6).sqrt() * block.ln2_post.w  # RMSNorm
    torch.testing.assert_close(mlp_out_image(model, 1, z), by_hand.detach())
    feats = Features(
        torch.nn.functional.normalize(torch.randn(3, 24), dim=1), method="m", hook=HOOK
    )
    mapped = post_norm_targets(model, feats, feats.directions, [0, 2])
    vector, hook = mapped[2]
    assert hook == "blocks.1.hook_mlp_out" and float(vector.norm()) == pytest.approx(1.0)
    expected = mlp_out_image(model, 1, feats.directions[2])
    torch.testing.assert_close(vector, expected / expected.norm())
    assert post_norm_targets(tiny_model, feats, feats.directions, [0]) == {}  # no ln2_post: as is


# --- the presets ------------------------------------------------------------------------


def test_protocol_presets_resolve_and_explicit_values_win():
    paper = Steering(protocol="paper")
    assert (paper.top_p, paper.stop_at_eos, paper.alpha_search, paper.max_features) == (
        None,
        False,
        "bisection",
        None,
    )
    assert (paper.judge_failure, paper.judge_attempts, paper.description) == (
        "zero",
        2,
        "input_centric",
    )
    assert (
        Steering(protocol="feature").top_p == 0.3 and Steering(protocol="feature").max_features == 3
    )
    assert Steering(protocol="paper", top_p=0.3).top_p == 0.3  # remove one deviation at a time
    assert Steering(protocol="feature", top_p=None).top_p is None  # top-k only on request
    assert Steering(protocol="feature", max_features=None).max_features is None  # every feature
    with pytest.raises(ConfigError, match="generated_diffmean.*protocol feature or paper"):
        Steering(protocol="concept", direction="generated_diffmean")
    with pytest.raises(ConfigError, match="needs a judge that writes"):
        ConceptDetection(protocol="paper").check_judge(_Failing())
    dataset = ConceptDetection()
    assert not dataset.needs_judge and dataset.needs_neutral and dataset.min_concepts == 2


def test_reference_rating_format_reads_the_first_bracketed_or_bare_rating():
    from bench.judges.base import parse_rating

    assert parse_rating("Rating: 0 because it is absent", "reference").score == 0.0
    assert parse_rating("Rating: [[2]] then Rating: [[1]]", "reference").score == 2.0  # the first
    assert parse_rating("Rating: [[2]] then Rating: [[1]]", "strict").score == 1.0  # the last
    assert parse_rating("Rating: 0 because", "strict").score is None  # featbench: brackets only
    assert parse_rating("Rating: 3", "reference").score is None  # out of range: not kept


def test_the_job_refuses_the_paper_detection_without_a_judge(tmp_path):
    """`needs_judge` depends on the protocol, and the job checks it before any work."""
    from hydra import compose, initialize_config_dir

    from bench.job.run import run_job
    from tests.conftest import REPO

    overrides = [
        "task=[concept_detection]",
        "task.concept_detection.protocol=paper",
        "judge=none",
        "logger=none",
        "hydra.mode=RUN",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides[:-1])
    with pytest.raises(ConfigError, match="concept_detection needs a judge"):
        run_job(cfg, tmp_path / "job")
    assert not (tmp_path / "job").exists()
