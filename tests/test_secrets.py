"""Secrets outside the key field: a key pasted where a variable name belongs, and
credentials inside a URL. Each is planted, and every file a run writes is searched."""

from __future__ import annotations

import os
import subprocess

import pytest

from bench.core.secrets import REDACTED, check_env_name, looks_like_secret, redact, redact_text
from bench.errors import ConfigError
from tests.conftest import featbench_cmd

KEY = "sk-proj-Zq8xWv3Lm0Ny7Tb2Kc5Rd9Hs4Fg6Ja1"  # a planted OpenAI-style key
URL_SECRET = "Vq7Rt2Pk9Mx4Wz1Ln8"  # the password part of a planted URL
URL = f"http://featbench-user:{URL_SECRET}@127.0.0.1:9/v1"


def test_values_that_look_like_keys_and_url_userinfo_are_redacted():
    for text in (
        KEY,
        "hf_" + "a1B2c3D4e5F6g7H8i9J0kL",
        "0123456789abcdef" * 2 + "01234567",
        "Zx9" * 11,
    ):
        assert looks_like_secret(text) and redact_text(f"key {text} end") == f"key {REDACTED} end"
    assert redact_text(URL) == f"http://{REDACTED}@127.0.0.1:9/v1"
    for text in (
        "gpt-4o-mini",
        "https://api.openai.com/v1",
        "blocks.12.mlp.hook_post",
        "gemma-scope-2b-pt-mlp-canonical",
        "OPENAI_API_KEY",
        "5d41402abc4b2a76",
        "I think that",
        "/root/.cache/featbench/models/smollm2-135m-0123abcd",
    ):
        assert not looks_like_secret(text) and redact_text(text) == text, text
    tree = {"judge": {"base_url": URL, "api_key_env": KEY, "model": "m"}, "layers": [1, 2]}
    assert redact(tree) == {
        "judge": {
            "base_url": f"http://{REDACTED}@127.0.0.1:9/v1",
            "api_key_env": REDACTED,
            "model": "m",
        },
        "layers": [1, 2],
    }


def test_an_environment_variable_name_that_looks_like_a_key_is_refused():
    check_env_name("judge.api_key_env", "OPENAI_API_KEY")
    check_env_name("judge.api_key_env", None)
    for bad in (KEY, "my key", "export X=1"):
        with pytest.raises(ConfigError, match="must name an environment variable") as info:
            check_env_name("judge.api_key_env", bad)
        assert KEY not in str(info.value)


def _run(args, cwd, extra_env):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", **extra_env}
    return subprocess.run(
        featbench_cmd() + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _leaks(root, *secrets) -> list[str]:
    found = []
    for path in [root, *root.rglob("*")]:
        names = str(path.relative_to(root.parent))
        content = path.read_bytes() if path.is_file() else b""
        found += [f"{path}: {s}" for s in secrets if s in names or s.encode() in content]
    return found


def test_a_key_on_the_command_line_or_in_a_url_is_refused(tmp_path):
    for arg in (f"judge.api_key_env={KEY}", f"judge.base_url={URL}"):
        out = _run([arg, f"paths.results_dir={tmp_path}"], tmp_path, {})
        assert out.returncode == 2 and "environment variable" in out.stderr
        assert KEY not in out.stderr + out.stdout and URL_SECRET not in out.stderr + out.stdout
    assert not any(tmp_path.rglob("*"))


@pytest.mark.integration
def test_planted_secrets_reach_no_file_of_a_run(tmp_path, embedded):
    """A key pasted into api_key_env through an environment variable is refused with
    exit 2; credentials in the judge's URL are redacted in every file of a finished run
    (config.yaml, parquet, report, W&B) and in folder names."""
    env = {"FB_TEST_KEY": KEY, "FB_TEST_URL": URL, "WANDB_MODE": "offline"}
    refused = _run(
        [
            "experiment=smoke",
            "judge=openai",
            "judge.api_key_env=${oc.env:FB_TEST_KEY}",
            f"paths.results_dir={tmp_path / 'refused'}",
            "logger=none",
        ],
        tmp_path,
        env,
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "must name an environment variable" in refused.stdout + refused.stderr
    ran = _run(
        [
            "experiment=smoke",
            "judge=openai",
            "judge.base_url=${oc.env:FB_TEST_URL}",
            "judge.api_key_env=null",
            "task=[concept_detection]",
            f"paths.results_dir={tmp_path / 'ran'}",
            "logger=wandb",
        ],
        tmp_path,
        env,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert any((tmp_path / "ran").rglob("metrics.parquet")) and any(
        (tmp_path / "ran").rglob("report.md")
    )
    assert any("wandb" in p.parts for p in (tmp_path / "ran").rglob("*"))
    assert _leaks(tmp_path, KEY, URL_SECRET) == []
    assert URL_SECRET not in refused.stdout + refused.stderr + ran.stdout + ran.stderr
    assert KEY not in refused.stdout + refused.stderr + ran.stdout + ran.stderr
