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
