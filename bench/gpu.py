"""Benchmark on a CUDA machine: ``vs_peers.py``'s comparisons on the GPU, in bf16 and fp16, and at full vocabulary.

Run ``cd bench && python gpu.py`` on a machine with a CUDA GPU (never needed by CI; on a CPU-only machine it says so
and exits without measuring, so ``make bench`` still runs everywhere). It runs the same workers as
``vs_peers.py`` (the same models, batches, step-0 loss check, alternated rounds, peers in ``bench/.peers``)
with ``KDISTILL_BENCH_DEVICE=cuda`` and:

* the encoder comparison against TextBrewer, float32;
* the LLM comparison against TRL in float32, bfloat16 and float16 (models and batches in that dtype), V = 49,152;
* the LLM comparison in bfloat16 at V = 128,256 (Llama 3's vocabulary), where the full logits dominate memory.

Peak memory on the GPU is the CUDA allocator's peak (``torch.cuda.max_memory_allocated``) over the one at the start.
Prints the same tables as ``vs_peers.py`` and writes the ``gpu`` section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os

import torch
import transformers

import vs_peers
from _results import machine_line, write_section

SETTINGS = [("float32", 49_152), ("bfloat16", 49_152), ("float16", 49_152), ("bfloat16", 128_256)]


def main(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        print(
            "bench/gpu.py needs a CUDA GPU; this machine has none, so it measures nothing (vs_peers.py is the CPU run)"
        )
        return
    os.environ["KDISTILL_BENCH_DEVICE"] = "cuda"
    vs_peers.peer_python()
    body = [
        "## On a GPU (`bench/gpu.py`)",
        "",
        f"{machine_line()}, {torch.cuda.get_device_name()}, transformers {transformers.__version__}.",
        "",
        *vs_peers.encoder_section(args.rounds, args.encoder_steps, 5),
        "",
    ]
    for dtype, vocab in SETTINGS:
        os.environ["KDISTILL_BENCH_DTYPE"], os.environ["KDISTILL_BENCH_VOCAB"] = dtype, str(vocab)
        body += [f"#### {dtype}, V = {vocab:,}", "", *vs_peers.llm_section(args.rounds, args.llm_steps, 2), ""]
    text = "\n".join(body)
    print(text)
    write_section("gpu", text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--encoder-steps", type=int, default=50)
    parser.add_argument("--llm-steps", type=int, default=10)
    main(parser.parse_args())
