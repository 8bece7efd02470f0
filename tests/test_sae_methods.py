"""topk_sae (trained with sae-lens) and sae_pretrained (loaded through sae-lens).

Small synthetic activations with planted sparse directions; no language model.
"""

from __future__ import annotations

import re
import time

import pytest
import torch

from featbench.methods.base import ActivationSet, Features
from featbench.methods.sae_pretrained import SAEPretrained
from featbench.methods.topk_sae import SAEFeatures, TopKSAE, reconstruction_stats

HOOK = "blocks.3.mlp.hook_post"
N, D, PLANTED, ACTIVE = 2000, 64, 8, 2
# Small and fast: 16 latents for 8 planted directions, 4 kept per token.
SMALL = dict(d_sae=16, k=4, epochs=30.0, batch_size=128, lr=3e-3, seed=0, device="cpu")


def activation_set(x: torch.Tensor, hook: str = HOOK) -> ActivationSet:
    ids = torch.arange(x.shape[0])
    return ActivationSet(acts=x, token_ids=ids, sentence_ids=ids, positions=ids, hook=hook)


@pytest.fixture(scope="module")
def acts() -> ActivationSet:
    """Each token: 2 of 8 planted unit directions with positive weights, a shared
    offset and a little noise, i.e. low-rank sparse data a TopK SAE should fit."""
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(PLANTED, D, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    which = torch.rand(N, PLANTED, generator=g).argsort(dim=1)[:, :ACTIVE]
    codes = torch.zeros(N, PLANTED).scatter_(1, which, 1 + torch.rand(N, ACTIVE, generator=g))
    offset = 0.5 * torch.randn(D, generator=g)
    return activation_set(codes @ directions + offset + 0.01 * torch.randn(N, D, generator=g))


@pytest.fixture(scope="module")
def trained(acts) -> SAEFeatures:
    return TopKSAE(**SMALL).fit(acts)


def test_topk_sae_trains_sparse_unit_directions_that_reconstruct(acts, trained):
    assert isinstance(trained, SAEFeatures) and trained.method == "topk_sae"
    assert trained.hook == HOOK and trained.directions.shape == (SMALL["d_sae"], D)
    torch.testing.assert_close(trained.directions.norm(dim=1), torch.ones(SMALL["d_sae"]))
    codes = trained.encode(acts)
    assert codes.shape == (N, SMALL["d_sae"]) and (codes >= 0).all()
    assert ((codes != 0).sum(dim=1) <= SMALL["k"]).all()
    recon = trained.decode(codes)
    assert recon.shape == (N, D)
    fvu = ((acts.acts - recon) ** 2).sum() / ((acts.acts - acts.acts.mean(0)) ** 2).sum()
    assert fvu < 0.5, f"FVU {fvu:.3f}"
    assert trained.info["fvu"] == pytest.approx(fvu.item(), rel=1e-4)
    for key in ("train_seconds", "final_loss", "fvu", "k", "d_sae", "steps"):
        assert key in trained.info
    assert trained.info["k"] == SMALL["k"] and trained.info["d_sae"] == SMALL["d_sae"]


def test_topk_sae_is_deterministic_given_the_seed(acts, trained):
    again = TopKSAE(**SMALL).fit(acts)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(again.extra[name], trained.extra[name]), name
    assert torch.equal(again.directions, trained.directions)
    other = TopKSAE(**{**SMALL, "seed": 1, "epochs": 1.0}).fit(acts)
    assert not torch.equal(other.extra["W_enc"], trained.extra["W_enc"])


def test_topk_sae_features_round_trip_through_save_and_load(acts, trained, tmp_path):
    loaded = Features.load(trained.save(tmp_path / "features"))
    assert type(loaded) is SAEFeatures and loaded.method == "topk_sae"
    assert torch.equal(loaded.directions, trained.directions)
    assert sorted(loaded.extra) == sorted(trained.extra)
    codes = trained.encode(acts)
    assert torch.equal(loaded.encode(acts), codes)
    assert torch.equal(loaded.decode(codes), trained.decode(codes))
    assert loaded.info["sae"] == trained.info["sae"]


@pytest.mark.parametrize(
    "bad", [dict(k=0), dict(k=17), dict(batch_size=0), dict(lr=0.0), dict(epochs=0.0)]
)
def test_topk_sae_rejects_bad_config(bad):
    with pytest.raises(ValueError, match="topk_sae"):
        TopKSAE(**{**SMALL, **bad})


def test_sae_pretrained_from_path_matches_the_saved_sae(acts, trained, tmp_path):
    sae, _ = TopKSAE(**SMALL).train_sae(acts)
    sae.save_model(tmp_path / "sae")  # sae-lens's own format
    features = SAEPretrained(path=str(tmp_path / "sae")).fit(acts)
    assert type(features) is SAEFeatures and features.method == "sae_pretrained"
    with torch.no_grad():
        expected = sae.encode(acts.acts)
    torch.testing.assert_close(features.encode(acts), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features.encode(acts), trained.encode(acts), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features.directions, trained.directions)
    assert features.info["fvu"] == pytest.approx(trained.info["fvu"], rel=1e-4)


@pytest.mark.parametrize("architecture", ["standard", "jumprelu"])
def test_sae_pretrained_replays_relu_and_jumprelu_saes(acts, tmp_path, architecture):
    from sae_lens import SAE

    cfg = {"architecture": architecture, "d_in": D, "d_sae": 12, "metadata": {"hook_name": HOOK}}
    sae = SAE.from_dict(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.3)
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.rand(12, generator=g))
    sae.save_model(tmp_path / architecture)
    features = SAEPretrained(path=str(tmp_path / architecture)).fit(acts)
    assert features.info["sae"]["architecture"] == architecture
    with torch.no_grad():
        expected = sae.encode(acts.acts)
    torch.testing.assert_close(features.encode(acts), expected)
    torch.testing.assert_close(features.decode(expected), sae.decode(expected).detach())
    loaded = Features.load(features.save(tmp_path / "features"))
    assert torch.equal(loaded.encode(acts), features.encode(acts))


def test_sae_pretrained_refuses_what_it_cannot_replay(acts, tmp_path):
    from sae_lens import SAE

    SAE.from_dict({"architecture": "gated", "d_in": D, "d_sae": 8}).save_model(tmp_path / "g")
    with pytest.raises(ValueError, match="'gated' is not supported"):
        SAEPretrained(path=str(tmp_path / "g")).fit(acts)


def test_sae_pretrained_names_both_sides_of_a_mismatch(acts, tmp_path):
    sae, _ = TopKSAE(**{**SMALL, "epochs": 1.0}).train_sae(acts)
    sae.save_model(tmp_path / "sae")
    method = SAEPretrained(path=str(tmp_path / "sae"))
    other_hook = "blocks.4.mlp.hook_post"
    with pytest.raises(ValueError) as err:
        method.fit(activation_set(acts.acts, hook=other_hook))
    assert HOOK in str(err.value) and other_hook in str(err.value)
    with pytest.raises(ValueError) as err:
        method.fit(activation_set(acts.acts[:, :32]))
    assert re.search(r"\b64\b", str(err.value)) and re.search(r"\b32\b", str(err.value))


def test_sae_pretrained_config_errors(tmp_path):
    with pytest.raises(ValueError, match="either"):
        SAEPretrained()
    with pytest.raises(ValueError, match="either"):
        SAEPretrained(release="r", sae_id="s", path=str(tmp_path))
    with pytest.raises(ValueError, match="go together"):
        SAEPretrained(release="gpt2-small-res-jb")
    with pytest.raises(ValueError, match="cfg.json"):
        SAEPretrained(path=str(tmp_path))


def _release_fails_fast(acts) -> str:
    started = time.perf_counter()
    with pytest.raises(ValueError) as err:
        SAEPretrained(release="gpt2-small-res-jb", sae_id="blocks.0.hook_resid_pre").fit(acts)
    assert time.perf_counter() - started < 10
    message = str(err.value)
    assert "model=smollm2-135m" in message and "method.path" in message
    return message


def test_sae_pretrained_release_offline_fails_fast(acts, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _release_fails_fast(acts)
    assert "not reachable" in message or "not in the local cache" in message


def test_sae_pretrained_release_cache_only_mode_fails_fast(acts, monkeypatch):
    """huggingface_hub in offline mode (HF_HUB_OFFLINE set at start): sae-lens tries the
    local cache, which lacks the SAE, and that error is reworded."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "not in the local cache" in _release_fails_fast(acts)


def test_reconstruction_stats_of_a_perfect_decoder_is_zero(acts):
    class Identity(Features):
        def encode(self, acts):
            return acts.acts if isinstance(acts, ActivationSet) else acts

        def decode(self, codes):
            return codes

    identity = Identity(torch.eye(D), method="identity", hook=HOOK)
    assert reconstruction_stats(identity, acts.acts) == (0.0, 0.0)
