"""Supervised fine-tuning (trl's SFTTrainer) on prompt/completion conversations.

Examples are tokenised here into input_ids + labels (prompt masked), so the loss falls on the
completion only; the template/EOS contract gate (tunesmith.contract) checks those labels as the
trainer's own collator batches them, before step one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tunesmith import contract
from tunesmith.data.formatting import read_split
from tunesmith.objectives import Plan

log = logging.getLogger("tunesmith.train")

NAME = "sft"
# Files of the recipe's data folder the train rule reads (the format stage's splits).
INPUTS = {"train": "train.jsonl", "eval": "eval.jsonl"}


def config_class():
    from trl import SFTConfig

    return SFTConfig


def config_kwargs(args: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    return {"max_length": args["max_length"], "packing": bool(args["packing"])}


def dataset(examples: list[dict[str, Any]]):
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])


def build_trainer(model: Any, tokenizer: Any, config: Any, train: Any, evals: Any, callbacks: list[Any],
                  token_metrics: bool = True, **extra: Any):
    from transformers import Trainer
    from trl import SFTTrainer

    from tunesmith import batching

    class Grouped(SFTTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            # train.args.group_by_length: the grouped order a function of seed and epoch, so a resume replays it.
            return batching.seeded(super()._get_train_sampler(*args, **kwargs), self.args.seed)

    class Plain(Grouped):
        """SFTTrainer with transformers' own loss (logits + cross-entropy) instead of trl's fused LM
        head, whose extra outputs (entropy, top-1 over the whole vocabulary) feed only trl's
        per-step logs, which the stage does not record. Same loss, same token normalisation."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False  # as trl does: packed position ids are honoured only without a cache
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    cls = Grouped if token_metrics else Plain
    return cls(model=model, args=config, train_dataset=train, eval_dataset=evals,
               processing_class=tokenizer, callbacks=callbacks)


def prepare(s: Any, paths: Any, section: dict[str, Any]) -> Plan:
    """Prompt/completion rows tokenised here into input_ids + labels (prompt masked), and the gate that
    checks those labels as the trainer's own collator batches them, before step one."""
    args, tokenizer = s.args, s.tokenizer
    max_length = args["max_length"]
    train_examples = contract.tokenize_rows(tokenizer, read_split(paths.train), max_length)
    eval_rows = read_split(paths.eval) if paths.eval and Path(paths.eval).is_file() else []
    eval_examples = contract.tokenize_rows(tokenizer, eval_rows, max_length)

    def gate(trainer: Any) -> None:
        gen = getattr(trainer.model, "generation_config", None)
        for name, examples, batch in (("train", train_examples, args["per_device_train_batch_size"]),
                                      ("eval", eval_examples, args["per_device_eval_batch_size"])):
            if examples:
                contract.gate(examples, tokenizer, collator=trainer.data_collator, generation_config=gen,
                              max_length=max_length, batch_size=batch, name=name)
        log.info("contract gate passed: %d train and %d eval examples end with a supervised %r",
                 len(train_examples), len(eval_examples), tokenizer.eos_token)

    return Plan(train=dataset(train_examples), eval=dataset(eval_examples) if eval_examples else None,
                before_train=gate, trainer_kwargs={"token_metrics": bool(args["token_metrics"])},
                metrics={"packing": bool(args["packing"])})
