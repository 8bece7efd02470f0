"""index.html, `featbench-report`'s feature browser, on small synthetic sweeps (no model).

The jobs are written with the real result writer (tests/test_report.py's `write_job`) and
read back with `bench.report.build`, as the report reads a sweep; the browser test
(tests/test_browser.py) opens the page of a real smoke run in Chromium.
"""

from __future__ import annotations

import json
import logging
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from bench.fit.contexts import token_texts, top_contexts
from bench.report import build, report
from bench.report import html as html_module
from bench.report.html import html_page
from featbench.methods.base import ActivationSet, Features
from featbench.methods.snmf_hier import HierarchicalSNMF
from tests.test_report import _fit_features, _rows_concept, _rows_reconstruction, write_job

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
TOKENS = [" a", " slice", " of", " sour", "dough", " bread", HOSTILE]
ACTS = [0.0, 0.1, -0.4, 0.9, 2.0, 0.5, 0.0]


def _concept_steering(method: str, feature: int, text: str) -> list[dict]:
    """The concept protocol's rows for concepts food and music: samples, per-feature scores
    and the summary row."""
    rows = []
    for concept in ("food", "music"):
        unit = {
            "feature": feature,
            "concept": concept,
            "sign": 1,
            "description_text": concept,
            "match_auroc": 0.8,
            "protocol": "concept",
            "description": "label",
            "judge": "offline",
        }
        for kl, alpha in ((0.1, 3.0), (0.5, 6.0)):
            for sample in (0, 1):
                common = {
                    **unit,
                    "kl_target": kl,
                    "sample": sample,
                    "alpha": alpha,
                    "kl_achieved": kl,
                    "prompt": "I think that",
                    "text": f"{text} {kl}",
                }
                rows += [
                    {**common, "metric": m, "value": v}
                    for m, v in (
                        ("concept_score", 1.0),
                        ("fluency_score", 2.0),
                        ("steering_score", 1.33),
                    )
                ]
        rows += [
            {**unit, "metric": m, "value": 1.0, "kl_target": 0.5}
            for m in ("heldout_steering_score", "best_kl_steering_score")
        ]
    rows.append(
        {
            "metric": "heldout_steering_score",
            "value": 0.9,
            "ci_low": 0.5,
            "ci_high": 1.3,
            "n": 2,
            "protocol": "concept",
            "description": "label",
            "judge": "offline",
        }
    )
    return rows


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Three jobs: diffmean and random on the concept protocol, snmf_hier with a tree; the
    diffmean job's contexts carry per-token activations, its samples hostile text. Shared
    by the module's tests: each only (re)writes the report's outputs."""
    root = tmp_path_factory.mktemp("html") / "sweep"
    detection = _rows_concept([0.9, 0.8], False, 0.85) + [
        {"feature": 0, "concept": "food", "metric": "s_cd", "value": 0.7, "encoder": "native"}
    ]
    detection[2].update(selected_feature=0, encoder="native")  # concept_best_auroc
    write_job(
        root / "0",
        "diffmean",
        1,
        {"concept_detection": detection, "steering": _concept_steering("diffmean", 0, HOSTILE)},
        supervised=True,
    )
    write_job(
        root / "1",
        "random",
        1,
        {
            "concept_detection": _rows_concept([0.6, 0.5], False, 0.55),
            "steering": _concept_steering("random", 1, "plain text"),
        },
    )
    context = {
        "sentence": 0,
        "position": 4,
        "score": 2.0,
        "token": "dough",
        "top": 4,
        "context": "a slice of sour[[dough]] bread",
        "tokens": TOKENS,
        "acts": ACTS,
    }
    (root / "0" / "features").mkdir(parents=True)
    (root / "0" / "features" / "contexts.json").write_text(json.dumps([[context], []]))
    write_job(root / "2", "snmf_hier", 1, {"reconstruction": _rows_reconstruction(0.3)})
    _fit_features(
        root / "2", HierarchicalSNMF(ranks=[6, 3], sparsity=0.5, max_iter=20, device="cpu")
    )
    return root


def test_report_writes_the_page_with_tables_cards_and_views(sweep):
    report(sweep)
    page = (sweep / "index.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    order = [
        page.index(f'<section id="{s}"')
        for s in ("comparison", "concepts", "features", "hierarchy")
    ]
    assert order == sorted(order)  # the comparison first
    assert '<table class="headline">' in page and "0.90 [0.50, 1.30] n=2" in page
    assert "diffmean †" in page  # supervised
    assert '<table class="differences">' in page and "heldout_steering_score" in page
    assert '<article id="feature:0:0" class="card"' in page  # steered and best for food
    assert "best for food (native)" in page and "S_CD 0.70" in page
    assert '<span class="kind">label (sign +1)</span> food' in page  # description and kind
    assert "α 3.00" in page and "concept 1.00 · fluency 2.00 · steering 1.33" in page
    assert '<section class="concept" id="concept:food" data-concept="food">' in page
    concept = page.split('id="concept:music"')[1].split("</section>")[0]
    assert concept.count('<div class="column"') == 2  # diffmean and random side by side
    assert 'data-kl="0.1"' in concept and 'data-kl="0.5"' in concept
    assert '<option value="0.1">' in page  # the KL target chosen on the page


def test_tokens_are_shaded_by_activation(sweep):
    page = html_page(build(sweep), sweep, [])
    card = page.split('<article id="feature:0:0"')[1].split("</article>")[0]
    assert '<span class="tok p9 top" title="2">dough</span>' in card  # the largest: full shade
    assert '<span class="tok p4" title="0.9"> sour</span>' in card
    assert '<span class="tok n2" title="-0.4"> of</span>' in card  # negative: the other colour
    assert " a" in card and 'title="0"' not in card  # an inactive token is plain text


def test_every_text_is_escaped(sweep):
    page = html_page(build(sweep), sweep, [])
    assert HOSTILE not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page  # samples and token
    assert page.count("<script>") == 1  # the page's own


def test_the_page_loads_nothing_and_stays_small(sweep):
    report(sweep)
    page = (sweep / "index.html").read_text(encoding="utf-8")
    refs = _references(page)
    assert refs and all(r.startswith(("#", "data:")) for r in refs), refs
    assert not re.search(r"https?://", page), "a network address in the page"
    assert "@import" not in page and "url(" not in page
    assert "default-src 'none'" in page  # the Content-Security-Policy
    assert "data:image/png;base64," in page  # the plots are embedded
    assert len(page.encode("utf-8")) < 500_000


def test_tree_nodes_link_to_their_cards(sweep):
    page = html_page(build(sweep), sweep, [])
    tree = page.split('<section id="hierarchy">')[1]
    assert "<details><summary>" in tree and 'data-tree="open"' in tree
    links = set(re.findall(r'href="#(feature:2:\d+)"', tree))
    assert links == {f"feature:2:{f}" for f in range(9)}  # every node of levels 6 + 3
    for target in links:  # hidden until a link opens it
        assert f'<article id="{target}" class="card extra" hidden' in page


def test_a_large_page_is_written_with_a_warning(sweep, monkeypatch, caplog):
    monkeypatch.setattr(html_module, "LIMIT", 1000)
    with caplog.at_level(logging.WARNING, logger="bench.report.html"):
        report(sweep)
    assert (sweep / "index.html").is_file()
    assert any("above the" in r.getMessage() for r in caplog.records)


def _references(page: str) -> list[str]:
    """Every URL an element of the page would load or link to (src, href, ...)."""
    found: list[str] = []
    names = ("src", "href", "action", "data", "poster", "srcset", "formaction")

    class Links(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.extend(value or "" for name, value in attrs if name in names)

    Links().feed(page)
    return found


class _Bytes:
    """A byte-level tokenizer: a character can span two tokens, as in GPT-2's vocabulary."""

    pieces = [b"a", b" caf", b"\xc3", b"\xa9", b" ok"]

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_token_texts_spell_the_decoded_text():
    tokenizer = _Bytes()
    assert token_texts(tokenizer, [0, 4]) == ["a", " ok"]
    assert token_texts(tokenizer, [1, 2, 3, 4]) == [" caf", "", "é", " ok"]
    assert "".join(token_texts(tokenizer, [1, 2])) == tokenizer.decode([1, 2])  # cut inside é


def test_top_contexts_record_each_tokens_activation():
    ids = torch.tensor([0, 1, 2, 3, 4, 0])
    acts = ActivationSet(
        torch.tensor([[0.1], [0.5], [0.2], [0.9], [0.3], [0.4]]),
        ids,
        torch.tensor([0, 0, 0, 0, 0, 1]),
        torch.arange(6),
        "hook",
    )
    features = Features(torch.ones(1, 1), method="x", hook="hook")
    [[first, second]] = top_contexts(features, acts, _Bytes(), window=2)
    assert first["tokens"] == [" caf", "", "é", " ok"] and first["top"] == 2
    assert first["acts"] == pytest.approx([0.5, 0.2, 0.9, 0.3])
    assert first["token"] == "\ufffd" and first["score"] == pytest.approx(0.9)
    assert second["tokens"] == ["a"] and second["top"] == 0
