"""Code in the docs is code users paste: every python block of docs/*.md runs, in order, per page."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

DOCS = sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md"))
PAGES = [page for page in DOCS if "```python" in page.read_text()]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_doc_code_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write runs/... relative to the working directory
    namespace: dict = {}
    for number, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)):
        exec(compile(block, f"{page.name}[block {number}]", "exec"), namespace)
    assert os.listdir(tmp_path), "the examples wrote nothing"
