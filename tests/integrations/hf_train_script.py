"""A tiny DistillationTrainer run driven by the command line, for tests that need separate (data-parallel) processes.

    python hf_train_script.py OUT [--batch-size 4] [--max-steps 2] [--no-average-tokens]
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ... hf_train_script.py OUT ...

Trains a 1-layer Llama student against a 2-layer Llama teacher (both built from configs, seeded, so every process
builds the same models) on 8 fixed examples with plain SGD, a constant learning rate and no clipping, so the
update of each step is the learning rate times the gradient. Writes into OUT:

* ``initial.safetensors`` (rank 0): the student before training, to turn final weights into updates;
* ``rank-<r>.safetensors``: each rank's student after training (DDP must leave them identical);
* ``rank-<r>.json``: per optimizer step the counted next-token positions this rank saw and the global count the
  trainer normalized by, and (on every rank) the trainer's ``log_history``.

The models are copied here rather than imported from tests/conftest.py so that the script runs as a plain program
under ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import gc
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from kdistill.core.shift import counted_next_tokens
from kdistill.integrations import DistillationArguments, DistillationTrainer

SEQ = 10
VOCAB = 128


def _seeded_build(seed: int, build: Callable[[], PreTrainedModel]) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def make_tiny_llama(num_layers: int, hidden: int, seed: int) -> PreTrainedModel:
    """A ``LlamaForCausalLM`` as tests/conftest.py builds it: untied embeddings, GQA, eager attention, no dropout."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    return _seeded_build(seed, lambda: LlamaForCausalLM(config))


def examples(n: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Pre-padded examples of length SEQ whose counted next-token positions differ (lengths and prompts differ).

    The same construction as ``_examples`` in tests/integrations/test_hf.py, without the prompt columns.
    """
    generator = torch.Generator().manual_seed(seed)
    result = []
    for i in range(n):
        length = 3 + (i * 5) % (SEQ - 2)  # 3..10
        prompt = i % 3
        ids = torch.randint(5, 120, (SEQ,), generator=generator)
        mask = (torch.arange(SEQ) < length).long()
        ids = ids * mask
        labels = ids.masked_fill(mask == 0, -100)
        labels[:prompt] = -100
        result.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return result


def stack(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([e[key] for e in batch]) for key in batch[0]}


class RecordingTrainer(DistillationTrainer):
    """Records, per optimizer step, this rank's counted positions and the global count the loss is divided by."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counts: list[dict[str, int]] = []

    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device
    ) -> tuple[list[Any], torch.Tensor | None]:
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batches:
            local = sum(int(counted_next_tokens(b["labels"]).sum()) for b in batches)
            self.counts.append({"local": local, "global": None if num_items is None else int(num_items)})
        return batches, num_items


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--no-average-tokens", action="store_true", help="average_tokens_across_devices=False")
    options = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(options.out)

    student = make_tiny_llama(num_layers=1, hidden=16, seed=1)
    teacher = make_tiny_llama(num_layers=2, hidden=32, seed=0)
    args = DistillationArguments(
        output_dir=str(out / "trainer"),
        use_cpu=True,
        report_to=[],
        max_steps=options.max_steps,
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        logging_steps=1,
        per_device_train_batch_size=options.batch_size,
        learning_rate=1.0,
        seed=0,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        temperature=2.0,
        hard_weight=0.5,
        average_tokens_across_devices=not options.no_average_tokens,
    )
    trainer = RecordingTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=examples(), data_collator=stack
    )
    rank = trainer.accelerator.process_index
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().clone().contiguous() for k, v in student.state_dict().items()},
            str(out / "initial.safetensors"),
        )
    trainer.accelerator.wait_for_everyone()
    trainer.train()
    state = {
        k: v.detach().contiguous() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()
    }
    save_file(state, str(out / f"rank-{rank}.safetensors"))
    record = {
        "num_processes": trainer.accelerator.num_processes,
        "counts": trainer.counts,
        "log_history": trainer.state.log_history,
    }
    (out / f"rank-{rank}.json").write_text(json.dumps(record, indent=1))
    # Shut down in order: every rank has written its files, then the DDP model (whose reducer holds the gloo group)
    # is freed, then the group is destroyed. Left to interpreter exit, the gloo teardown sometimes aborted a rank
    # ("terminate called without an active exception") or hung it.
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    del trainer, state
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    main()
