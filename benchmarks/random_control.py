"""What a random direction scores in concept detection, under variants of the
sentence score, on the embedded model and the shipped dataset.

The concept_detection task scores a sentence by the max over its tokens of a
feature's code. This script takes the `random` method's 100 directions and
reports `mean_feature_auroc` (concept chosen on the train split, AUROC on the
test split, exactly as the task does) for:

- max over tokens (the task's definition), and mean over tokens;
- max over tokens with the sentence's token count regressed out (a
  quadratic in log length, fitted on the train split);
- max over tokens of ReLU(projection - q-quantile of the train projections):
  a random direction made as sparse as a dictionary feature.

It also prints, per concept, how well token count alone separates it.

    python benchmarks/random_control.py [--layer 12]
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from bench.activations.extraction import extract
from bench.data.datasets import load
from bench.models import load_model
from featbench.methods.random import RandomDirections
from featbench.tasks.concept_detection import auroc_matrix


def mean_feature_auroc(scores: np.ndarray, labels: np.ndarray, train, test, concepts):
    positives = labels[:, None] == np.array(concepts)[None, :]
    chosen = np.nan_to_num(auroc_matrix(scores[train], positives[train]), nan=0.5).argmax(0)
    test_auc = auroc_matrix(scores[test], positives[test])
    return float(test_auc[chosen, np.arange(scores.shape[1])].mean()), chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    lm = load_model("smollm2-135m")
    ds = load()
    acts = extract(lm.model, ds, args.layer, "mlp_post", model_fingerprint=lm.fingerprint)
    feats = RandomDirections(seed=args.seed).fit(acts)
    proj = (acts.acts.float() @ feats.directions.T).numpy()
    sid = acts.sentence_ids.numpy()
    n = len(ds)
    labels = np.array(ds.labels)
    train, test = ds.indices("train"), ds.indices("test")
    concepts = ds.concepts
    length = np.bincount(sid, minlength=n)

    def sentence_max(values: np.ndarray) -> np.ndarray:
        out = np.full((n, values.shape[1]), -np.inf)
        np.maximum.at(out, sid, values)
        return out

    def report(name: str, scores: np.ndarray) -> None:
        value, chosen = mean_feature_auroc(scores, labels, train, test, concepts)
        top = Counter(concepts[c] for c in chosen).most_common(3)
        print(f"{name:<52} {value:.3f}   most matched: {top}")

    print(f"# random directions ({feats.directions.shape[0]}), layer {args.layer}, test split")
    report("max over tokens (the task)", sentence_max(proj))
    mean = np.zeros((n, proj.shape[1]))
    np.add.at(mean, sid, proj)
    report("mean over tokens", mean / length[:, None])
    design = np.stack([np.ones(n), np.log(length), np.log(length) ** 2], 1)
    best = sentence_max(proj)
    beta, *_ = np.linalg.lstsq(design[train], best[train], rcond=None)
    report("max over tokens, token count regressed out", best - design @ beta)
    train_rows = np.isin(sid, train)
    for q in (0.99, 0.998):
        tau = np.quantile(proj[train_rows], q, axis=0)
        report(
            f"max of ReLU(projection - {q:.1%} quantile)", sentence_max(np.maximum(proj - tau, 0))
        )

    print("\n# token count alone, one-vs-rest test AUROC (top 5 concepts)")
    positives = labels[:, None] == np.array(concepts)[None, :]
    auc = auroc_matrix(length[test, None].astype(float), positives[test])[:, 0]
    for c in np.argsort(-auc)[:5]:
        print(
            f"{concepts[c]:<20} {auc[c]:.3f}  mean tokens {length[labels == concepts[c]].mean():.1f}"
        )
    print(f"neutral mean tokens {length[labels == 'neutral'].mean():.1f}, all {length.mean():.1f}")


if __name__ == "__main__":
    main()
