"""docs/adapters.md: its example of a custom adapter runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "adapters.md"


def test_the_custom_adapter_example_runs():
    code = "\n".join(re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL))
    assert "class TinyAdapter(Adapter)" in code and "adapter=TinyAdapter()" in code
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(code, str(DOC), "exec"), {"__name__": "adapters_doc"})  # noqa: S102 - the docs' own code
    finally:
        torch.set_num_threads(threads)
