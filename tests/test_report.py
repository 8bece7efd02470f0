"""`featbench-report`: merged table, markdown report, plots and per-feature pages.

The unit tests build small synthetic sweeps with the real result writer
(`finalize` + `write_metrics`) and real SNMF fits for the features' side files;
the integration test reports on a real two-method multirun of the smoke experiment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from bench.report import ReportError, cli, report
from bench.results import (
    REPLICATES_FILE,
    finalize,
    pop_replicates,
    read_metrics,
    setting_hash,
    write_metrics,
    write_replicates,
)
from featbench.methods.base import ActivationSet
from featbench.methods.snmf import SNMF
from featbench.methods.snmf_hier import HierarchicalSNMF
from featbench.tasks.concept_detection import ConceptDetection
from featbench.tasks.reconstruction import Reconstruction
from featbench.tasks.steering import Steering
from featbench.tasks.synthetic_recovery import SyntheticRecovery
from tests.conftest import REPO, featbench_cmd

HOOK = "blocks.3.mlp.hook_post"
PNG = b"\x89PNG\r\n\x1a\n"
CONTEXT = "a slice of warm sour[[dough]] bread"
SAMPLE = "pasta with garlic and basil tastes great"
CODE = "featbench 0.1.0+g1111111"
BASE = {"model.name": "smollm2-135m", "layer": 3, "hook": "mlp_post", "dataset.name": "concepts"}


def setting(method: str, **keys) -> dict:
    """A job's meta["setting"] as bench.results.setting_of writes it (flat dotted keys)."""
    return {
        **BASE,
        "method._target_": f"methods.{method}.X",
        **{f"method.{k}": v for k, v in keys.items()},
    }


DECLARED = {
    cls.name: cls for cls in (ConceptDetection, Steering, Reconstruction, SyntheticRecovery)
}


def write_job(
    folder: Path,
    method: str,
    seed: int,
    tasks: dict[str, list[dict]],
    keys: dict | None = None,
    code: str = CODE,
    dataset: str = "d0",
    meta: bool = True,
    digest: str = "digest0",
    declare: bool = True,
    **extra,
) -> int:
    """A job folder as bench.cli.featbench writes it: metrics.parquet (with meta["setting"]) and
    replicates.parquet; summary rows may carry `replicates` (an Estimate's row())."""
    keys = keys if keys is not None else setting(method)
    run = {
        "run_id": f"{method}-{seed}",
        "model": "smollm2-135m",
        "layer": 3,
        "hook": HOOK,
        "method": method,
        "seed": seed,
        "config_hash": f"{setting_hash(keys)}-{seed}",
        "setting_hash": setting_hash(keys),
        "code_version": code,
        "code_digest": digest,
        "dataset_hash": dataset,
        "dataset_version": "1",
    }
    frames, reps = [], {}
    for task, rows in tasks.items():
        rows = [dict(r) for r in rows]
        reps.update(pop_replicates(rows, task))
        frames.append(finalize(rows, {**run, "task": task}))
    frame = pd.concat(frames, ignore_index=True).assign(**extra)
    if not meta:  # a job written by older code: no setting_hash, no meta["setting"]
        frame = frame.drop(columns=["setting_hash"])
    declared = {task: DECLARED[task].declaration() for task in tasks if task in DECLARED}
    recorded = {"setting": keys, "tasks": declared} if declare else {"setting": keys}
    write_metrics(frame, folder / "metrics.parquet", recorded if meta else {})
    write_replicates(folder / REPLICATES_FILE, reps)
    return len(frame)


def _rows_concept(aurocs: list[float], supervised: bool, summary: float) -> list[dict]:
    rows = [
        {"feature": f, "concept": "food", "metric": "auroc", "value": v, "encoder": "native"}
        for f, v in enumerate(aurocs)
    ]
    rows += [
        {"concept": "food", "metric": "concept_best_auroc", "value": max(aurocs)},
        {"metric": "mean_feature_auroc", "value": summary, "encoder": "native"},
        {"metric": "concept_coverage", "value": 0.5, "threshold": 0.9, "encoder": "native"},
    ]
    return [{**r, "supervised": supervised} for r in rows]


def _rows_steering(score: float, low: float, high: float, kind: str = "tokens") -> list[dict]:
    rows = []
    for sample, (value, text) in enumerate([(2.0, SAMPLE), (0.0, "I think that it is fine")]):
        common = {
            "feature": 0,
            "concept": "food",
            "kl_target": 0.1,
            "sign": 1,
            "sample": sample,
            "text": text,
            "description_text": "food",
            "judge": "offline",
        }
        rows += [
            {**common, "metric": m, "value": v}
            for m, v in (
                ("concept_score", value),
                ("fluency_score", 2.0),
                ("steering_score", value),
            )
        ]
        rows.append({**common, "kl_target": 0.5, "metric": "steering_score", "value": 0.5})
    rows += [
        {
            "feature": 0,
            "concept": "food",
            "metric": "best_kl_steering_score",
            "value": 1.0,
            "kl_target": 0.1,
            "sign": 1,
            "judge": "offline",
        },
        {
            "metric": "heldout_steering_score",
            "value": score,
            "ci_low": low,
            "ci_high": high,
            "n": 12,
            "judge": "offline",
        },
        {
            "metric": "best_kl_steering_score",
            "value": None,
            "reason": "no defined score",
            "judge": "offline",
        },
    ]
    return [{**r, "description": kind} for r in rows]


def _rows_synthetic(mcc: float) -> list[dict]:
    return [
        {"metric": m, "value": v * (1 - noise), "generator": g, "noise": noise}
        for g in ("snmf", "sae_lens")
        for noise in (0.0, 0.5)
        for m, v in (("mcc", mcc), ("recovered_fraction", 0.25))
    ]


def _rows_reconstruction(fvu: float) -> list[dict]:
    return [
        {"metric": m, "value": v}
        for m, v in (("fvu", fvu), ("kl_spliced", 0.02), ("ce_delta", 0.1))
    ]


def _fit_features(folder: Path, method) -> None:
    """A real fit on random non-negative data, saved as a job saves its features."""
    gen = torch.Generator().manual_seed(0)
    n = 120
    ids = torch.arange(n)
    acts = ActivationSet(torch.rand(n, 24, generator=gen), ids % 7, ids // 6, ids % 6 + 1, HOOK)
    method.fit(acts).save(folder / "features")


@pytest.fixture()
def sweep(tmp_path: Path) -> tuple[Path, int]:
    """Four jobs: diffmean (supervised), two seeds of snmf (one nested deeper) and
    snmf_hier; returns the folder and the number of rows written."""
    root = tmp_path / "sweep"
    n = write_job(
        root / "0",
        "diffmean",
        1,
        {
            "concept_detection": _rows_concept([0.9, 0.8], True, 0.85),
            "steering": _rows_steering(0.73, 0.42, 1.04),
            "synthetic_recovery": [
                {**r, "value": None, "reason": "needs labels"} for r in _rows_synthetic(0)
            ],
        },
        tag=True,
    )
    contexts = [
        [{"sentence": 0, "position": 5, "score": 2.1, "token": "dough", "context": CONTEXT}],
        [{"sentence": 1, "position": 2, "score": 1.0, "token": " and", "context": "x[[ and]] y"}],
    ]
    (root / "0" / "features").mkdir(parents=True)
    (root / "0" / "features" / "contexts.json").write_text(json.dumps(contexts))
    for folder, seed, fvu in ((root / "1", 1, 0.2), (root / "more" / "2", 2, 0.4)):
        n += write_job(
            folder,
            "snmf",
            seed,
            {
                "concept_detection": _rows_concept([0.6, 0.7, 0.5], False, 0.6),
                "steering": _rows_steering(0.35, 0.1, 0.5),
                "reconstruction": _rows_reconstruction(fvu),
                "synthetic_recovery": _rows_synthetic(0.9),
            },
            tag="seed run",
        )
        _fit_features(folder, SNMF(rank=4, sparsity=0.5, max_iter=20, patience=5, device="cpu"))
    n += write_job(root / "3", "snmf_hier", 1, {"reconstruction": _rows_reconstruction(0.3)})
    _fit_features(
        root / "3", HierarchicalSNMF(ranks=[6, 3], sparsity=0.5, max_iter=20, device="cpu")
    )
    return root, n


def test_report_merges_every_job_into_tables_per_setting(sweep):
    root, n_rows = sweep
    path = report(root)
    assert path == root / "report.md"
    summary, _ = read_metrics(root / "summary.parquet")
    assert len(summary) == n_rows
    assert {"tag", "generator", "noise", "ci_low", "text", "supervised", "job_dir"} <= set(summary)
    assert {"setting", "setting_hash"} <= set(summary)
    assert sorted(summary["job_dir"].unique()) == ["0", "1", "3", "more/2"]
    assert set(summary["setting"]) == {"diffmean", "snmf", "snmf_hier"}  # nothing else varies
    text = path.read_text()
    tables = text.count("| setting |")
    assert tables == 4  # steering, concept detection, reconstruction, synthetic recovery
    for name in ("diffmean †", "snmf", "snmf_hier"):  # one row per setting in every table
        assert sum(line.startswith(f"| {name} |") for line in text.splitlines()) == tables
    assert text.index("### Steering") < text.index("### Concept detection")  # headline first
    assert (
        "| setting | heldout_steering_score ↑ | best_kl_steering_score ↑ | description | judge |"
        in text
    )
    assert "| diffmean † | 0.73 [0.42, 1.04] n=12 | — | tokens | offline |" in text
    assert "| snmf | 0.35 n=12 · 2 seeds | — | tokens | offline |" in text  # mean of two seeds
    assert "| snmf | 0.30 · 2 seeds | 0.02 · 2 seeds | 0.10 · 2 seeds |" in text
    assert "| snmf_hier | 0.30 | 0.02 | 0.10 |" in text
    assert "mean_feature_auroc (native) ↑" in text and "| fvu ↓ |" in text  # declared directions
    assert "mcc (snmf, noise 0)" in text and "| snmf | 0.90 · 2 seeds | 0.25 · 2 seeds |" in text
    assert "upper reference" in text
    assert "[features.md](features.md)" in text
    assert "mix results from" not in text  # one code version
    assert (root / "differences.parquet").is_file() and "## Differences between settings" in text


def test_plots_are_valid_pngs_linked_from_the_report(sweep):
    root, _ = sweep
    text = report(root).read_text()
    for name in ("steering_vs_kl.png", "auroc_by_method.png", "snmf_loss.png"):
        assert (root / name).read_bytes()[:8] == PNG
        with Image.open(root / name) as image:
            image.verify()
        assert f"({name})" in text
    assert "## Hierarchical SNMF trees" in text and "ranks [6, 3]" in text
    assert "- feature 6" in text and "  - feature" in text  # a coarse root with a child


def test_features_page_shows_contexts_descriptions_and_steered_samples(sweep):
    root, _ = sweep
    report(root, top=2)
    page = (root / "features.md").read_text()
    block = page.split("## diffmean · job `0`")[1].split("\n## ")[0]
    assert "### feature 0 · best steering 1.00 (KL 0.1, sign +1) · AUROC 0.90 for `food`" in block
    assert "Description: food" in block
    assert f"- 2.10 `dough`: {CONTEXT}" in block
    assert f"- KL 0.1, sign +1 · steering 2.00, concept 2.00, fluency 2.00: “{SAMPLE}”" in block
    assert block.index(SAMPLE) < block.index("I think that it is fine")  # best first
    assert "### feature 1 · AUROC 0.80" in block  # then by AUROC
    assert "No per-feature rows" in page.split("## snmf_hier")[1]


def test_absent_plot_data_is_skipped_with_one_log_line(tmp_path, caplog):
    write_job(tmp_path / "job", "pca", 0, {"reconstruction": _rows_reconstruction(0.1)})
    with caplog.at_level("INFO", logger="bench.report"):
        text = report(tmp_path).read_text()
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 5  # four plots (the steering headline among them) and the tree
    assert not list(tmp_path.glob("*.png")) and "## Plots" not in text
    assert "| pca | 0.10 | 0.02 | 0.10 |" in text


def test_cli_errors_name_the_directory(tmp_path, capsys):
    for folder in (tmp_path / "absent", tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            cli([str(folder)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(folder) in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written into the empty folder


def test_module_entry_point_exits_2_on_an_empty_folder(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "bench.report", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert (
        out.stderr
        == f"featbench-report: {tmp_path}: no metrics.parquet under it; run featbench into it first\n"
    )


def test_a_corrupt_job_is_named_and_the_good_jobs_are_reported(sweep):
    root, _ = sweep
    report(root)
    good = pd.read_parquet(root / "summary.parquet")
    (root / "more" / "2" / "metrics.parquet").write_bytes(b"not a parquet file")
    text = report(root).read_text()
    assert "1 item(s) left out" in text and "`more/2/metrics.parquet`: unreadable" in text
    summary = pd.read_parquet(root / "summary.parquet")
    assert set(summary["job_dir"]) == set(good["job_dir"]) - {"more/2"}
    assert len(summary) == (good["job_dir"] != "more/2").sum()


def test_no_readable_job_is_an_error_and_earlier_outputs_survive(sweep):
    root, _ = sweep
    report(root)
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    for path in root.rglob("metrics.parquet"):
        path.write_bytes(b"not a parquet file")
    with pytest.raises(
        ReportError, match=r"no readable metrics\.parquet \(.*more/2/metrics\.parquet"
    ):
        report(root)
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before


@pytest.mark.integration
def test_report_on_a_real_two_method_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    args = ["-m", "experiment=smoke", "method=diffmean,random", f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(
        featbench_cmd() + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    done = subprocess.run(
        [sys.executable, "-m", "bench.report", str(sweep)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(sweep / "report.md")
    jobs = sorted(sweep.rglob("metrics.parquet"))
    assert len(jobs) == 2
    summary, _ = read_metrics(sweep / "summary.parquet")
    assert len(summary) == sum(len(read_metrics(p)[0]) for p in jobs)
    text = (sweep / "report.md").read_text()
    print(text)  # the excerpt a reviewer reads with -s
    assert set(summary["setting"]) == {"diffmean", "random"}  # only the method varies
    for method in ("diffmean †", "random"):
        assert f"| {method} |" in text
    diffs, _ = read_metrics(sweep / "differences.parquet")
    concept = diffs[diffs["metric"] == "mean_feature_auroc"]
    assert set(concept["encoder"]) == {"native", "projection"}  # one row per encoder
    assert concept["paired"].all() and set(concept["paired_over"]) == {"test sentence"}
    assert (concept["method_a"] == "diffmean").all() and (concept["method_b"] == "random").all()
    assert "### Steering" in text and "### Concept detection" in text
    for name in ("steering_vs_kl.png", "auroc_by_method.png"):
        assert (sweep / name).read_bytes()[:8] == PNG
    page = (sweep / "features.md").read_text()
    assert "[[" in page and "Steered samples" in page


def test_a_steering_cell_names_its_judge_its_failure_policy_and_its_direction():
    """Issue 17: a paper-protocol cell says which judge (model @ endpoint) rated it, that its
    failed judgements counted as 0, and that the DiffMean arm steered a generated direction."""
    from bench.report.tables import _judged_by

    paper = pd.DataFrame(
        {
            "judge": ["openai"],
            "judge_failure_policy": ["zero"],
            "judge_label": ["openai smollm2-135m @ http://127.0.0.1:8123/v1"],
        }
    )
    assert _judged_by(paper) == (
        "openai smollm2-135m @ http://127.0.0.1:8123/v1 (failed judgements scored 0)"
    )
    ours = pd.DataFrame({"judge": ["offline"], "judge_failure_policy": ["missing"]})
    assert _judged_by(ours) == "offline"


def test_the_plotted_and_compared_numbers_are_computed_once_by_the_series_module():
    """bench.report.series computes what plots and the paper comparison show: the steering
    curve is the mean over features, signs and samples per KL target; S_CD's per-feature
    mean is per job, then over the seeds of one setting."""
    from bench.report.series import feature_means, plot_series

    base = {
        "model": "m",
        "layer": 3,
        "hook": "h",
        "method": "snmf",
        "setting": "snmf",
        "setting_hash": "s1",
        "encoder": pd.NA,
    }
    steer = [
        {
            **base,
            "task": "steering",
            "metric": "steering_score",
            "feature": f,
            "kl_target": kl,
            "sample": s,
            "value": v,
            "job_dir": "0",
        }
        for f, kl, s, v in [(0, 0.5, 0, 1.0), (1, 0.5, 0, 0.0), (0, 1.0, 0, 2.0), (0, 1.0, 1, 1.0)]
    ]
    detect = [
        {
            **base,
            "task": "concept_detection",
            "metric": "auroc",
            "feature": f,
            "kl_target": pd.NA,
            "sample": pd.NA,
            "value": v,
            "job_dir": "0",
        }
        for f, v in [(0, 0.9), (1, 0.7)]
    ]
    s_cd = [
        {
            **base,
            "task": "concept_detection",
            "metric": "s_cd",
            "feature": f,
            "kl_target": pd.NA,
            "sample": pd.NA,
            "value": v,
            "job_dir": job,
        }
        for job, f, v in [("0", 0, 1.0), ("0", 1, 3.0), ("1", 0, 5.0), ("1", 1, 7.0)]
    ]
    summary = pd.DataFrame(steer + detect + s_cd)
    series = plot_series(summary)
    curve = series.steering_vs_kl.set_index("kl_target")["value"]
    assert curve.to_dict() == {0.5: 0.5, 1.0: 1.5}
    assert sorted(series.auroc["value"]) == [0.7, 0.9]
    [mean] = feature_means(summary).to_dict("records")
    assert mean["value"] == 4.0 and mean["text"].endswith("(n=2 features, 2 seeds)")
    empty = plot_series(summary[summary["task"] == "reconstruction"])
    assert empty.steering_vs_kl.empty and empty.auroc.empty


def test_an_unreadable_replicates_file_is_left_out_with_a_warning(tmp_path, caplog):
    """Issue 25: it used to become {} silently, and the cells lost their intervals."""
    write_job(tmp_path / "a", "snmf", 1, {"reconstruction": _rows_reconstruction(0.2)})
    (tmp_path / "a" / REPLICATES_FILE).write_bytes(b"junk")
    with caplog.at_level("WARNING", logger="bench.report"):
        text = report(tmp_path).read_text()
    assert "1 item(s) left out" in text and f"`a/{REPLICATES_FILE}`: unreadable" in text
    assert "no paired differences" in text
    assert any(
        REPLICATES_FILE in r.getMessage() for r in caplog.records if r.levelname == "WARNING"
    )
