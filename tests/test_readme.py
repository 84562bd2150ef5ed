"""The documentation's Python API example runs as written (docs/method.md, linked from the README)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

METHOD = Path(__file__).resolve().parents[1] / "docs" / "method.md"


def test_api_example_runs(tmp_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", METHOD.read_text(), flags=re.S)
    assert blocks, "docs/method.md has no python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "task 0: loss" in out and "task 1: loss" in out
    assert "remove" in out or "retain" in out
