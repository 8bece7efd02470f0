"""The README's quickstart commands and .ci/run stay the same commands."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_ci_runs_the_readme_quickstart_verbatim():
    readme = (REPO / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quickstart, flags=re.S)
    assert len(commands) == 2, commands
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci, f"{command!r} is not a line of .ci/run"
    assert commands[0].startswith("python3 -m venv .venv") and "torch==2.13.0" in commands[0]
    assert "pytest" in commands[1] and "ruff check" in commands[1]
