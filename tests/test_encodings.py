"""One encode per job: every task reads the job's shared encodings, and what they compute
from them equals encoding again (tiny random model: bookkeeping, not evidence of quality)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from bench.activations.extraction import extract, padded_batches, tokenize
from bench.data import datasets
from featbench.methods.pca import PCA
from featbench.tasks.base import TaskData
from featbench.tasks.concept_detection import ConceptDetection
from featbench.tasks.reconstruction import Reconstruction
from featbench.tasks.steering import Steering


@pytest.fixture()
def setup(tiny_model, tmp_path):
    data = datasets.load(concepts=["food", "music", "french"], max_per_concept=8, max_neutral=6)
    acts = extract(tiny_model, data, 1, "mlp_post", model_fingerprint="tiny-enc", use_cache=False)
    features = PCA(n_features=6).fit(acts.subset(data.indices("train")))
    return (
        tiny_model,
        data,
        acts,
        features,
        TaskData(dataset=data, activations=acts, seed=0, output_dir=tmp_path),
    )


def _count_rows(features, monkeypatch) -> list[int]:
    """Record the rows of every `encode` call on `features`."""
    seen: list[int] = []
    encode = features.encode

    def counting(x):
        seen.append(len(x))
        return encode(x)

    monkeypatch.setattr(features, "encode", counting)
    return seen


def test_every_task_shares_one_encoding_of_the_job(setup, monkeypatch):
    model, data, acts, features, task_data = setup
    seen = _count_rows(features, monkeypatch)
    ConceptDetection(resamples=20).evaluate(model, features, task_data, None)
    Steering(protocol="concept", concepts=2)._concept_units(features, task_data)
    Reconstruction(bootstrap=20).evaluate(model, features, task_data, None)
    assert sum(seen) == len(acts)  # every row encoded once, by all three tasks together
    assert task_data.encodings(features) is task_data.encodings(features)


def test_rows_and_decoded_align_with_the_subset(setup):
    _, data, acts, features, task_data = setup
    encodings = task_data.encodings(features)
    test = data.indices("test")
    subset = acts.subset(test)
    mask = encodings.rows(test)
    assert torch.equal(acts.acts[mask], subset.acts)
    direct = features.decode(features.encode(subset.acts.float()))
    torch.testing.assert_close(encodings.decoded(mask), direct)
    sentence = encodings.sentences("native")
    assert sentence.shape == (len(data), len(features))
    first = int(subset.sentence_ids[0])
    rows = acts.sentence_ids == first
    assert sentence[first].tolist() == pytest.approx(
        encodings.tokens("native")[rows].max(0).values.tolist()
    )


def test_splicing_the_shared_codes_equals_encoding_the_live_activations(setup):
    """Reconstruction splices decode(codes of the cached activations); encoding the live
    activations inside the forward pass instead gives the same KL (to float noise)."""
    model, data, acts, features, task_data = setup
    rows = Reconstruction(bootstrap=20).evaluate(model, features, task_data, None)
    got = next(r["value"] for r in rows if r["metric"] == "kl_spliced")
    test = data.indices("test")
    token_ids, _ = tokenize(model, [data.sentences[i] for i in test])

    def live(activation, hook, mask):
        out = activation.clone()
        out[mask] = features.decode(features.encode(activation[mask].float()))
        return out

    total = count = 0.0
    with torch.inference_mode():
        for _, tokens, real in padded_batches(model, token_ids, 4096):
            clean = model(tokens).log_softmax(-1)
            hooked = model.run_with_hooks(tokens, fwd_hooks=[(acts.hook, partial(live, mask=real))])
            kl = (clean.exp() * (clean - hooked.log_softmax(-1))).sum(-1) * real
            total, count = total + float(kl.sum()), count + float(real.sum())
    assert got == pytest.approx(total / count, rel=1e-4, abs=1e-7)
