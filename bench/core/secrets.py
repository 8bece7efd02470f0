"""Secrets: how featbench recognises them, and keeps them out of everything it writes.

A secret can reach a config three ways, and each is handled:

- under a secret-named key (`api_key`, `hf_token`, `password`): the value is replaced;
- as a value that looks like a credential wherever it sits (`sk-...`, `hf_...`, a long
  token of letters and digits), e.g. a key pasted into `judge.api_key_env`: the value is
  replaced, and `check_env_name` refuses it where a variable NAME is expected;
- inside a URL, as its user information (`https://user:key@host/v1`): the user
  information is replaced and the rest of the URL kept, so the endpoint stays readable.

`redact` applies all three to a config tree (config.yaml, the parquet metadata, the W&B
run, the report's setting labels); `redact_text` to free text (folder names, log lines,
error messages, failed.json). The one rule for callers: whatever leaves the process goes
through one of them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from bench.errors import ConfigError

REDACTED = "***REDACTED***"

# A name is secret when its last word is one of these (api_key, hf_token, client_secret,
# password, apikey); bos_token_id, max_new_tokens or token_position are not.
SECRET_LAST_WORDS = frozenset(
    {"key", "apikey", "token", "secret", "password", "passwd", "credentials", "authorization"}
)

# Values that look like credentials: well-known prefixes (OpenAI, Hugging Face, GitHub,
# Slack, AWS, Google, W&B's 40-hex keys), and any unbroken run of 32+ letters and digits
# that mixes both (random tokens). Words, paths, dashed names (`gemma-scope-2b-pt-mlp`),
# featbench's own 16-hex hashes and numbers are not. A false positive would merge two
# configs' hashes, so the generic rule stays narrow.
_KEY_PATTERNS = (
    r"sk-[A-Za-z0-9_\-]{16,}",
    r"hf_[A-Za-z0-9]{20,}",
    r"gh[pousr]_[A-Za-z0-9]{20,}",
    r"xox[abpr]-[A-Za-z0-9\-]{10,}",
    r"AKIA[0-9A-Z]{16}",
    r"AIza[0-9A-Za-z_\-]{30,}",
    r"[0-9a-f]{40}",
    r"(?=[A-Za-z0-9]*[0-9])(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{32,}",
)
_KEY = re.compile(r"(?<![A-Za-z0-9_\-])(?:" + "|".join(_KEY_PATTERNS) + r")(?![A-Za-z0-9_\-])")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s]+)@")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_secret_name(name: str) -> bool:
    """True for `api_key`, `hf_token`, `client_secret`, `password`, `WANDB_API_KEY`, ...:
    the name's last word is a secret word (`bos_token_id`, `max_new_tokens` are not)."""
    words = re.split(r"[_\-.]+", str(name).lower())
    return bool(words) and words[-1] in SECRET_LAST_WORDS


def looks_like_secret(text: str) -> bool:
    """True when `text` holds something that looks like a credential or URL userinfo."""
    return bool(_KEY.search(text) or _USERINFO.search(text))


def redact_text(text: str) -> str:
    """`text` with credential-looking tokens replaced and URL userinfo masked."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _KEY.sub(REDACTED, text)


def redact(obj: object) -> object:
    """A copy of a config tree with the values of secret-named keys replaced, and every
    string value passed through `redact_text`."""
    if isinstance(obj, Mapping):
        return {k: (REDACTED if is_secret_name(k) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def check_env_name(key: str, value: str | None) -> None:
    """Refuse a value given where the NAME of an environment variable is expected
    (`judge.api_key_env`) when it is not a variable name, or looks like a key itself."""
    if value is None:
        return
    if looks_like_secret(value) or not _ENV_NAME.fullmatch(value):
        shown = "a value that looks like a key" if looks_like_secret(value) else repr(value)
        raise ConfigError(
            f"{key} must name an environment variable (e.g. OPENAI_API_KEY), and got {shown}. "
            "Put the key itself in the environment: export OPENAI_API_KEY=... and pass "
            f"{key}=OPENAI_API_KEY"
        )
