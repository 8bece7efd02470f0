"""Calibration of the `offline` judge: `python -m bench.cli.calibrate_judge`.

On the shipped dataset's train split, with the neutral sentences as the
unsteered baseline, for each description kind the judge is used with:

- `label`: the concept's name, `label.replace("_", " ")`;
- `tokens`: the concept's `TOP_TOKENS` most distinctive tokens of the train
  split (`distinctive_tokens`), under the embedded model's tokenizer, listed as
  the steering task lists a feature's top-activating tokens ("goal, match, ...").

For each kind it measures how well the concept delta separates a concept's
sentences from other concepts' sentences (AUROC per concept, mean and min,
pooled over concepts with one threshold, and pooled as a z-score), and picks
`somewhat` = q95 of the off-concept deltas (1 in 20 unrelated texts gets 1) and
`clear` = the median on-concept delta (a typical concept sentence gets 2).

Fluency: NLL of `n_fluency` train sentences after BOS only and of their seeded
word shuffles: `fluency_fluent` = q90 of the real ones, `fluency_somewhat` = q10
of the shuffled ones, `repetition_weight` = 2 x `fluency_somewhat`.

Token lists are chosen on the train split, the split they are scored on, so the
train AUROC of `tokens` is optimistic; the integration tests measure both kinds
on the test split with the train split's token lists.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from collections import Counter
from typing import Any

import numpy as np
import torch

from bench.judges.offline import EXAMPLES
from bench.tasks.detection import auroc

TOP_TOKENS = 8  # as the steering task's `top_tokens`: the length of a feature's token list
LOOP_TOKENS = 40  # a degenerate continuation's length: about the steering task's 50 new tokens
PRIOR = 0.5  # Dirichlet pseudo-count per token string: rare tokens need evidence to rank


def shuffle_words(text: str, seed: int) -> str:
    words = text.split()
    random.Random(seed).shuffle(words)
    return " ".join(words)


def fluency_sample(dataset: Any, split: str, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """A deterministic sample of a split's sentences, and their seeded word shuffles."""
    idx = sorted(np.random.default_rng(seed).permutation(dataset.indices(split))[:n].tolist())
    sentences = [dataset.sentences[i] for i in idx]
    return sentences, [shuffle_words(s, seed + i) for i, s in enumerate(sentences)]


def loop(text: str, tokenizer: Any, seed: int, length: int = LOOP_TOKENS) -> str:
    """A degenerate continuation made from a real sentence: a seeded span of 1-4 of its
    tokens repeated to `length` tokens (what a steered model writes when pushed too far:
    `The Sun. The Sun.`, `s)s)s)`, newline runs)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    rng = random.Random(seed)
    span = rng.randint(1, min(4, len(ids)))
    start = rng.randrange(0, len(ids) - span + 1)
    piece = ids[start : start + span]
    return tokenizer.decode((piece * (length // span + 1))[:length])


def continuations(model: Any, n: int, seed: int = 0) -> tuple[str, list[str]]:
    """The unsteered model's own continuations of the steering task's prompt, sampled as the
    steering task samples (its defaults): fluent text of the kind the judge is asked about."""
    from bench.core.hooks import hook_name
    from bench.tasks.steering.generate import generate
    from bench.tasks.steering.settings import SteeringSettings

    task = SteeringSettings()  # the steering task's defaults, resolved for its protocol
    prompt = task.prompts[0]
    zero = torch.zeros(model.cfg.d_model)
    specs = [(prompt, zero, (seed, 0, 0, 0, i)) for i in range(n)]
    texts = generate(model, hook_name(0, "resid_post"), specs, task)
    return prompt, [t for t in texts if t.strip()]


def distinctive_tokens(
    sentences: list[str], labels: list[str], tokenizer: Any, top: int = TOP_TOKENS
) -> dict[str, list[str]]:
    """Per concept, the `top` token strings most over-represented in its sentences
    against the other concepts' sentences (neutral ones excluded).

    A token string is a decoded token with its spaces stripped, as a feature's top
    tokens are listed. Ranking: the log-odds ratio with a uniform Dirichlet prior,
    divided by its standard error (Monroe, Colaresi and Quinn 2008), which favours
    tokens both frequent in the concept and rare elsewhere; ties by string.
    """
    from bench.data.datasets import NEUTRAL

    counts: dict[str, Counter] = {}
    for sentence, label in zip(sentences, labels, strict=True):
        if label == NEUTRAL:
            continue
        ids = tokenizer(sentence, add_special_tokens=False).input_ids
        words = (tokenizer.decode([i]).strip() for i in ids)
        counts.setdefault(label, Counter()).update(w for w in words if w)
    total = sum(counts.values(), Counter())
    vocab_prior = PRIOR * len(total)
    out = {}
    for concept, own in counts.items():
        n_own, n_other = sum(own.values()), sum(total.values()) - sum(own.values())

        def z(word: str, own: Counter = own, n_own: int = n_own, n_other: int = n_other) -> float:
            a, b = own[word] + PRIOR, total[word] - own[word] + PRIOR
            own_odds, other_odds = a / (n_own + vocab_prior - a), b / (n_other + vocab_prior - b)
            return float(np.log(own_odds / other_odds) / np.sqrt(1 / a + 1 / b))

        out[concept] = sorted(own, key=lambda w: (-z(w), w))[:top]
    return out


def token_list(tokens: list[str]) -> str:
    """A token description as the steering task writes one."""
    return ", ".join(dict.fromkeys(tokens))


def separation(
    judge: Any,
    sentences: list[str],
    labels: list[str],
    baseline: list[str],
    descriptions: dict[str, str],
) -> dict[str, Any]:
    """AUROC of the concept delta, per concept (its sentences vs other concepts'), and the
    pooled on- and off-concept deltas."""
    from bench.data.datasets import NEUTRAL

    aurocs, pos, neg, z_pos, z_neg = {}, [], [], [], []
    base_v = judge.embed(baseline)
    for concept, desc in descriptions.items():
        values = np.array(judge.concept_values(sentences, desc, baseline))
        pos.append(values[[lab == concept for lab in labels]])
        neg.append(values[[lab not in (concept, NEUTRAL) for lab in labels]])
        aurocs[concept] = auroc(pos[-1], neg[-1])
        spread = float(np.std(base_v @ judge.embed([desc])[0], ddof=1))
        z_pos.append(pos[-1] / spread)  # the z-score alternative, for comparison
        z_neg.append(neg[-1] / spread)
    found = _summary(aurocs, pos, neg)
    found["pooled_auroc_zscore"] = auroc(np.concatenate(z_pos), np.concatenate(z_neg))
    return found


def _summary(aurocs: dict[str, float], pos: list, neg: list) -> dict[str, Any]:
    """Per-concept AUROCs and the pooled on- and off-concept deltas, as `report` reads them."""
    on, off = np.concatenate(pos), np.concatenate(neg)
    return {
        "aurocs": aurocs,
        "auroc_mean": float(np.mean(list(aurocs.values()))),
        "auroc_min": min(aurocs.values()),
        "auroc_min_concept": min(aurocs, key=aurocs.__getitem__),
        "pooled_auroc": auroc(on, off),
        "off_concept_delta_q95": float(np.quantile(off, 0.95)),
        "on_concept_delta_median": float(np.median(on)),
    }


def example_separation(judge: Any, dataset: Any, seed: int = 0) -> dict[str, Any]:
    """The `examples` kind on the train split, without scoring a sentence against a centroid
    it is part of: per concept, a seeded half of its train sentences makes the centroid, and
    the other half (on-concept) is scored against the other concepts' train sentences."""
    from bench.data.datasets import NEUTRAL

    sentences, labels, baseline = split_texts(dataset, "train")
    rng = np.random.default_rng(seed)
    aurocs, pos, neg = {}, [], []
    for concept in dataset.concepts:
        own = [s for s, lab in zip(sentences, labels, strict=True) if lab == concept]
        order = rng.permutation(len(own))
        half = len(own) // 2
        examples, held = [own[i] for i in order[:half]], [own[i] for i in order[half:]]
        others = [
            s for s, lab in zip(sentences, labels, strict=True) if lab not in (concept, NEUTRAL)
        ]
        on = np.array(judge.concept_values(held, concept, baseline, examples))
        off = np.array(judge.concept_values(others, concept, baseline, examples))
        pos.append(on)
        neg.append(off)
        aurocs[concept] = auroc(on, off)
    return _summary(aurocs, pos, neg)


def split_texts(dataset: Any, split: str) -> tuple[list[str], list[str], list[str]]:
    """A split's sentences, their labels and its neutral sentences (the baseline)."""
    from bench.data.datasets import NEUTRAL

    idx = dataset.indices(split)
    sentences, labels = [dataset.sentences[i] for i in idx], [dataset.labels[i] for i in idx]
    baseline = [s for s, lab in zip(sentences, labels, strict=True) if lab == NEUTRAL]
    return sentences, labels, baseline


def kind_descriptions(dataset: Any, tokenizer: Any) -> dict[str, dict[str, str]]:
    """{kind: {concept: description}} for every kind the offline judge is calibrated on;
    token lists always come from the train split."""
    sentences, labels, _ = split_texts(dataset, "train")
    tokens = distinctive_tokens(sentences, labels, tokenizer)
    return {
        "label": {c: c.replace("_", " ") for c in dataset.concepts},
        "tokens": {c: token_list(tokens[c]) for c in dataset.concepts},
    }


def calibrate(
    model: Any, dataset: Any, split: str = "train", n_fluency: int = 200
) -> dict[str, Any]:
    """Measure every separation on `split` and derive the thresholds (module docstring)."""
    from bench.judges.offline import OfflineJudge

    judge = OfflineJudge()
    judge.bind(model)
    sentences, labels, baseline = split_texts(dataset, split)
    judge.embed(sentences)  # one batched call for the whole split
    found: dict[str, Any] = {"concept_thresholds": {}}
    for kind, descriptions in kind_descriptions(dataset, model.tokenizer).items():
        measured = separation(judge, sentences, labels, baseline, descriptions)
        found[kind] = {"descriptions": descriptions, **measured}
        q95, median = measured["off_concept_delta_q95"], measured["on_concept_delta_median"]
        found["concept_thresholds"][kind] = {  # kept in order should the two ever overlap
            "somewhat": round(q95, 3),
            "clear": round(max(median, q95), 3),
            "auroc_mean": round(measured["auroc_mean"], 3),
            "auroc_min": round(measured["auroc_min"], 3),
        }
    measured = example_separation(judge, dataset)
    found[EXAMPLES] = {
        "descriptions": {c: "(its train sentences)" for c in dataset.concepts},
        **measured,
    }
    q95, median = measured["off_concept_delta_q95"], measured["on_concept_delta_median"]
    found["concept_thresholds"][EXAMPLES] = {
        "somewhat": round(q95, 3),
        "clear": round(max(median, q95), 3),
        "auroc_mean": round(measured["auroc_mean"], 3),
        "auroc_min": round(measured["auroc_min"], 3),
    }
    found |= fluency_calibration(judge, model, dataset, split, n_fluency)
    return found


def fluency_calibration(judge: Any, model: Any, dataset: Any, split: str, n: int) -> dict:
    """Fluent texts: the split's sentences (after BOS) and the unsteered model's own
    continuations of the steering prompt. Not fluent: the sentences' word shuffles and
    token loops made from them (`loop`). The penalty weight is 2 x the shuffles' q10 NLL
    (text half of whose token trigrams repeat scores 0); then `fluency_fluent` = q90 of
    the fluent texts' values and `fluency_somewhat` = q10 of the others'."""
    real, shuffled = fluency_sample(dataset, split, n)
    tokenizer = model.tokenizer
    loops = [loop(t, tokenizer, seed=i) for i, t in enumerate(real)]
    prompt, ours = continuations(model, n // 4)
    weight = 2 * float(np.quantile(judge.nll(shuffled, ""), 0.1))
    judge = dataclasses.replace(judge, repetition_weight=weight)
    judge.bind(model)
    value = {
        "sentences": np.array(judge.fluency_values(real, "")),
        "continuations": np.array(judge.fluency_values(ours, prompt)),
        "shuffled": np.array(judge.fluency_values(shuffled, "")),
        "loops": np.array(judge.fluency_values(loops, "")),
    }
    fluent = np.concatenate([value["sentences"], value["continuations"]])
    broken = np.concatenate([value["shuffled"], value["loops"]])
    q90, q10 = float(np.quantile(fluent, 0.9)), float(np.quantile(broken, 0.1))
    return {
        **{f"{k}_value_mean": float(v.mean()) for k, v in value.items()},
        "fluent_value_q90": q90,
        "broken_value_q10": q10,
        "sentences_vs_shuffled_auroc": auroc(value["shuffled"], value["sentences"]),
        "sentences_vs_loops_auroc": auroc(value["loops"], value["sentences"]),
        "continuations_vs_loops_auroc": auroc(value["loops"], value["continuations"]),
        "fluent_vs_broken_auroc": auroc(broken, fluent),
        "examples_of_loops": loops[:3],
        "examples_of_continuations": ours[:3],
        "fluency_thresholds": {
            "fluency_fluent": round(q90, 3),
            "fluency_somewhat": round(max(q10, q90), 3),
            "repetition_weight": round(weight, 3),
        },
    }


def report(found: dict[str, Any]) -> list[str]:
    """The lines the calibration prints."""
    lines = []
    for kind in found["concept_thresholds"]:
        m = found[kind]
        lines += [f"{kind}: description[{c}] = {d!r}" for c, d in m["descriptions"].items()]
        lines += [f"{kind}: auroc[{c}] = {a:.4f}" for c, a in m["aurocs"].items()]
        zscore = f" (z-score {m['pooled_auroc_zscore']:.4f})" if "pooled_auroc_zscore" in m else ""
        lines.append(
            f"{kind}: auroc_mean {m['auroc_mean']:.4f}, auroc_min {m['auroc_min']:.4f} "
            f"({m['auroc_min_concept']}), pooled_auroc {m['pooled_auroc']:.4f}{zscore}, "
            f"off_concept_delta_q95 {m['off_concept_delta_q95']:.4f}, on_concept_delta_median "
            f"{m['on_concept_delta_median']:.4f}"
        )
    for key, value in found.items():
        if key.endswith(("_mean", "_q90", "_q10", "_auroc")) and isinstance(value, float):
            lines.append(f"{key}: {value:.4f}")
    lines += [f"loop example: {t!r}" for t in found["examples_of_loops"]]
    lines += [f"continuation example: {t!r}" for t in found["examples_of_continuations"]]
    lines.append(f"concept_thresholds: {found['concept_thresholds']}")
    lines.append(f"fluency_thresholds: {found['fluency_thresholds']}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cli.calibrate_judge",
        description="measure the offline judge's separations and print its thresholds",
    )
    parser.add_argument("--device", default="cpu", help="device of the reference model")
    args = parser.parse_args(argv)
    from bench.data.datasets import load
    from bench.models import load_model

    model = load_model("smollm2-135m", device=args.device).model
    print("\n".join(report(calibrate(model, load()))))  # the command prints its findings


if __name__ == "__main__":
    main()
