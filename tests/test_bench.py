"""The benchmarks (``make bench``, not ``make test``) stay runnable: each script imports what it uses from kdistill
and parses its command line. Their measurements are not run here (they need a quiet machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(path for path in BENCH.glob("*.py") if not path.name.startswith("_"))


def test_make_bench_runs_every_script():
    makefile = (BENCH.parent / "Makefile").read_text()
    bench_line = next(line for line in makefile.splitlines() if "step_overhead.py" in line)
    assert {path.name for path in SCRIPTS} == {word for word in bench_line.split() if word.endswith(".py")}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.stem)
def test_bench_script_imports_and_parses_its_arguments(script):
    done = subprocess.run([sys.executable, script.name, "--help"], cwd=BENCH, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
