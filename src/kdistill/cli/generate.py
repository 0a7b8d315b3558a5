"""``kdistill generate``: the teacher completes prompts into a resumable jsonl (black-box distillation data).

The work is :func:`kdistill.generation.generate_dataset`; this module parses, builds the teacher the flags name and
prints what was written.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from kdistill.errors import InvalidArgumentError

if TYPE_CHECKING:
    from kdistill.generation import Teacher


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``generate`` to the ``kdistill`` subcommands; its handler is :func:`run` (set as ``func``)."""
    parser = subparsers.add_parser(
        "generate", help="black-box distillation data: the teacher completes prompts (resumable jsonl)"
    )
    parser.add_argument("--teacher", help="model directory or hub id (hf); a label for the output (openai)")
    parser.add_argument("--prompts", required=True, help="jsonl with prompt, instruction (+ input) or messages")
    parser.add_argument("--out", required=True, help="output jsonl; rerunning resumes it")
    parser.add_argument("--backend", choices=["hf", "openai"], default="hf")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (per append)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    decoding = parser.add_mutually_exclusive_group()
    decoding.add_argument("--do-sample", dest="do_sample", action="store_true", default=True, help="sample (default)")
    decoding.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding")
    parser.add_argument("--seed", type=int, default=0, help="batch b is generated under seed + b")
    parser.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    parser.add_argument("--system-prompt", help="a system turn put before each prompt")
    parser.add_argument("--prompt-field", default="auto", help="auto, messages, instruction, or a string field")
    parser.add_argument("--gguf-file", help="a GGUF file inside --teacher (hf; loaded as float32)")
    parser.add_argument("--device", help="hf: cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--api-base", default="https://api.openai.com/v1", help="openai: the server's base URL")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: env variable holding the key")
    parser.add_argument("--model", help="openai: the server's model name (default: --teacher)")
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--overwrite", action="store_true", help="start --out over instead of resuming it")
    parser.set_defaults(func=run)
    return parser

    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run :func:`~kdistill.generation.generate_dataset` from parsed arguments; 0 on success."""
    # kdistill.generation is imported here and below so that `kdistill --help` does not import torch
    from kdistill.generation import GenerationParams, generate_dataset

    params = GenerationParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        do_sample=args.do_sample,
        seed=args.seed,
        num_samples=args.num_samples,
    )
    result = generate_dataset(
        args.prompts,
        args.out,
        _teacher_from_args(args),
        params,
        batch_size=args.batch_size,
        prompt_field=args.prompt_field,
        system_prompt=args.system_prompt,
        limit=args.limit,
        overwrite=args.overwrite,
    )
    print(
        f"{result.total} prompts: {result.skipped} already done, {result.lines_written} lines written to "
        f"{result.out_path}"
    )
    return 0


def _teacher_from_args(args: argparse.Namespace) -> Teacher:
    """The teacher ``--backend`` names, refusing flags that belong to the other backend."""
    from kdistill.generation import HFTeacher, OpenAITeacher

    if args.backend == "openai":
        if args.gguf_file:
            raise InvalidArgumentError("--gguf-file applies to --backend hf only")
        model = args.model or args.teacher
        if not model:
            raise InvalidArgumentError("--backend openai needs --model (or --teacher) naming the server's model")
        return OpenAITeacher(
            model, api_base=args.api_base, api_key=os.environ.get(args.api_key_env), name=args.teacher
        )
    if not args.teacher:
        raise InvalidArgumentError("--teacher is required with --backend hf (a model directory or hub id)")
    if args.model:
        raise InvalidArgumentError("--model applies to --backend openai only; give the model with --teacher")
    return HFTeacher(args.teacher, gguf_file=args.gguf_file, device=args.device)
