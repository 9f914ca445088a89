"""Causal-LM pretraining (transformers' Trainer) on a corpus cut into full blocks of tokens."""

from __future__ import annotations

from typing import Any

NAME = "causal-lm"
# The pretrain rule reads the corpus itself (kind: pretrain); no train rule runs this objective.
INPUTS: dict[str, str] = {}


def config_class():
    from transformers import TrainingArguments

    return TrainingArguments


def config_kwargs(args: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    return {}


def dataset(blocks: list[list[int]]):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def build_trainer(model: Any, tokenizer: Any, config: Any, train: Any, evals: Any, callbacks: list[Any], **extra: Any):
    from transformers import Trainer, default_data_collator

    return Trainer(model=model, args=config, train_dataset=train, eval_dataset=evals,
                   data_collator=default_data_collator, callbacks=callbacks)
