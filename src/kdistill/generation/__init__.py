"""Black-box (sequence-level) distillation data: a teacher writes completions for prompts, the student learns them.

- :mod:`~kdistill.generation.prompts`: :class:`GenerationParams` (how the teacher samples), :class:`Prompt` and
  :func:`read_prompts` (a jsonl of ``prompt``, ``instruction`` + ``input`` or chat ``messages``).
- :mod:`~kdistill.generation.teachers`: the :class:`Teacher` protocol, :class:`HFTeacher` (a local or hub causal
  LM) and :class:`OpenAITeacher` (any OpenAI-compatible server).
- :mod:`~kdistill.generation.dataset`: :func:`generate_dataset`, which appends one record per (prompt, sample) to
  a jsonl file whose ``messages`` the SFT renderer reads as is; resumable, safe to kill, its parameters recorded in
  ``D.jsonl.meta.json``.

The command line is ``kdistill generate`` (:mod:`kdistill.cli.generate`).
"""

from kdistill.generation.dataset import COMPARED_META_FIELDS, GenerateResult, generate_dataset, meta_path, read_done
from kdistill.generation.prompts import ROLES, GenerationParams, Message, Prompt, read_prompts
from kdistill.generation.teachers import HFTeacher, OpenAITeacher, Teacher

__all__ = [
    "COMPARED_META_FIELDS",
    "ROLES",
    "GenerateResult",
    "GenerationParams",
    "HFTeacher",
    "Message",
    "OpenAITeacher",
    "Prompt",
    "Teacher",
    "generate_dataset",
    "meta_path",
    "read_done",
    "read_prompts",
]
