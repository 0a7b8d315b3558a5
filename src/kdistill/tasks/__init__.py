"""Tasks: how rows become examples, which logits and labels a model has, and how predictions are scored.

``TASKS`` maps a task name (as configs write it) to its class::

    task = TASKS.get("sequence")(text_column="sentence").with_label_names(splits["train"])
    examples = task.preprocess(splits["train"], tokenizer=tokenizer, max_length=128)
"""

from kdistill.registry import Registry
from kdistill.tasks.base import Task, evaluate_task, make_batches, predict_logits
from kdistill.tasks.causal_lm import CausalLMTask, CausalLMView, evaluate_lm, lm_agreement
from kdistill.tasks.classification import SequenceClassificationTask
from kdistill.tasks.qa import QAView, QuestionAnsweringTask
from kdistill.tasks.token import TokenClassificationTask, read_conll
from kdistill.tasks.token_examples import align_labels

TASKS: Registry[type] = Registry("task")
TASKS.register("sequence", SequenceClassificationTask, aliases=("classification", "sequence_classification"))
TASKS.register("token", TokenClassificationTask, aliases=("ner", "token_classification"))
TASKS.register("qa", QuestionAnsweringTask, aliases=("question_answering", "squad"))
TASKS.register("causal_lm", CausalLMTask, aliases=("lm", "sft", "causal_language_modeling"))

__all__ = [
    "TASKS",
    "CausalLMTask",
    "CausalLMView",
    "QAView",
    "QuestionAnsweringTask",
    "SequenceClassificationTask",
    "Task",
    "TokenClassificationTask",
    "align_labels",
    "evaluate_lm",
    "evaluate_task",
    "lm_agreement",
    "make_batches",
    "predict_logits",
    "read_conll",
]
