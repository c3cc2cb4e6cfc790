"""The README's commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    blocks = _bash_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) == 2
    demo, tests = blocks
    assert demo.endswith("peelnb demo") and "pip install torch==2.13.0" in demo
    assert tests.endswith("python -m pytest") and "pip install torch==2.13.0" in tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert tests in ci.splitlines()
