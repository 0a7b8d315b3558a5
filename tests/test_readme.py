"""The README's tour is code a user will paste: it must run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_two_setup_commands():
    first_lines = README.read_text().splitlines()[:6]
    assert any(line.startswith("make demo") for line in first_lines)
    assert any(line.startswith("make test") for line in first_lines)


def test_readme_tour_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python tour"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    loss = namespace["loss"]
    assert loss.ndim == 0 and loss.item() > 0
    assert namespace["hidden_s"].grad is not None and namespace["head_s"].grad is not None
