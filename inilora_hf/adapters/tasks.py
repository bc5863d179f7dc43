"""Which PEFT task type and which `Auto…` classes fit a model class (for exports that every loader takes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import nn
from transformers.models.auto import modeling_auto


class TaskClasses(NamedTuple):
    """The PEFT `task_type` of a model class and the auto classes that load it."""

    task_type: str | None
    auto_model: str  # transformers class that loads the merged checkpoint
    auto_peft_model: str  # peft class that loads the adapter together with its recorded base


# In order of preference: a class listed under several tasks gets the first.
_TASKS = (
    ("CAUSAL_LM", modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "AutoModelForCausalLM", "AutoPeftModelForCausalLM"),
    (
        "SEQ_2_SEQ_LM",
        modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        "AutoModelForSeq2SeqLM",
        "AutoPeftModelForSeq2SeqLM",
    ),
    (
        "SEQ_CLS",
        modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "AutoModelForSequenceClassification",
        "AutoPeftModelForSequenceClassification",
    ),
    (
        "TOKEN_CLS",
        modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
        "AutoModelForTokenClassification",
        "AutoPeftModelForTokenClassification",
    ),
    (
        "QUESTION_ANS",
        modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
        "AutoModelForQuestionAnswering",
        "AutoPeftModelForQuestionAnswering",
    ),
    ("FEATURE_EXTRACTION", modeling_auto.MODEL_MAPPING_NAMES, "AutoModel", "AutoPeftModelForFeatureExtraction"),
)


def task_classes(model: nn.Module, task_type: str | None = None) -> TaskClasses:
    """The PEFT task type of `model`'s class (`task_type` when given) and the matching `Auto…` class names.

    A class transformers' auto mappings do not list gets `task_type=None`, its own class name and `AutoPeftModel`
    (which loads through the adapter config's `auto_mapping`).

    Example:
        >>> from transformers import LlamaConfig, LlamaForSequenceClassification
        >>> task_classes(LlamaForSequenceClassification(LlamaConfig(hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, vocab_size=32)))  # doctest: +NORMALIZE_WHITESPACE
        TaskClasses(task_type='SEQ_CLS', auto_model='AutoModelForSequenceClassification',
                    auto_peft_model='AutoPeftModelForSequenceClassification')
    """
    name = type(model).__name__
    for task, mapping, auto_model, auto_peft_model in _TASKS:
        if task == task_type or (task_type is None and any(_lists(classes, name) for classes in mapping.values())):
            return TaskClasses(task, auto_model, auto_peft_model)
    return TaskClasses(task_type, name, "AutoPeftModel")


def _lists(classes: str | Sequence[str], name: str) -> bool:
    return name == classes if isinstance(classes, str) else name in classes
