"""Process measurements the benchmarks share: RSS, its peak, and how busy other processes kept the cores.

Imports only the standard library, so the benchmarks' peer environment (``vs_peers.py``'s venv, without kdistill)
uses it too.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from typing import Any

QUIET_SHARE = 0.1  # a case starts once other processes use less of the cores than this (waits a while at most)
NOISY_SHARE = 0.15  # a case during which other processes used more of the cores than this is run again
ATTEMPTS = 3  # at most this many runs of one case; the quietest counts
MIB = 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all cores since boot, from /proc/stat."""
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _others_share(busy_ticks: int, total_ticks: int, own_cpu_seconds: float) -> float:
    """The share of all cores that processes other than ours kept busy."""
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    return max(busy_ticks / ticks_per_second - own_cpu_seconds, 0.0) / max(total_ticks / ticks_per_second, 1e-9)


def _wait_for_quiet(limit_s: float = 300.0) -> None:
    """Other processes on this machine skew wall times: wait (a while, not forever) until they leave the cores idle."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        busy_before, total_before = _cpu_ticks()
        time.sleep(3.0)
        busy_after, total_after = _cpu_ticks()
        if _others_share(busy_after - busy_before, total_after - total_before, 0.0) < QUIET_SHARE:
            return


def run_measured(command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``command`` (which prints one JSON object as its last line) and add ``others``: the share of the cores
    that other processes used meanwhile."""
    busy_before, total_before = _cpu_ticks()
    own_before = _children_cpu_seconds()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    busy_after, total_after = _cpu_ticks()
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["others"] = _others_share(
        busy_after - busy_before, total_after - total_before, _children_cpu_seconds() - own_before
    )
    return result
