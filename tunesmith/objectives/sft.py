"""Supervised fine-tuning (trl's SFTTrainer) on prompt/completion conversations.

Examples are tokenised here into input_ids + labels (prompt masked), so the loss falls on the
completion only; the template/EOS contract gate (tunesmith.contract) checks those labels as the
trainer's own collator batches them, before step one.
"""

from __future__ import annotations

from typing import Any

NAME = "sft"


def config_class():
    from trl import SFTConfig

    return SFTConfig


def config_kwargs(args: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    return {"max_length": args["max_length"], "packing": bool(args["packing"])}


def dataset(examples: list[dict[str, Any]]):
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])


def build_trainer(model: Any, tokenizer: Any, config: Any, train: Any, evals: Any, callbacks: list[Any], **extra: Any):
    from trl import SFTTrainer

    return SFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=evals,
                      processing_class=tokenizer, callbacks=callbacks)
