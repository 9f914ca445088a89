"""Kahneman-Tversky optimisation (trl's KTOTrainer) on single completions labelled desirable or not.

Rows are conversational {id, prompt, completion, label: bool} (tunesmith.data.preference; pairs
are split into one row of each label before they get here). trl tokenises them itself.
"""

from __future__ import annotations

from typing import Any

from tunesmith.objectives import Plan
from tunesmith.objectives.dpo import drop_reference_adapter, prepare_preference

NAME = "kto"
# Files of the recipe's data folder the train rule reads: the curated pairs, split into labelled rows.
INPUTS = {"train": "pairs.jsonl"}
# KTO is unpaired: no reward accuracy; kl is its batch estimate of KL(policy || reference).
HISTORIES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl", "logps/chosen", "logps/rejected")
LOSS_IS_NLL = False  # its loss is no token NLL: the loop reports no perplexity
HEADLINE = ("rewards/margins", "kl")  # last values, in the stage's one-line summary


def config_class():
    from trl import KTOConfig

    return KTOConfig


def config_kwargs(args: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    return {"max_length": args["max_length"], "beta": settings["beta"], "loss_type": settings["loss_type"],
            "desirable_weight": settings["desirable_weight"], "undesirable_weight": settings["undesirable_weight"],
            "precompute_ref_log_probs": settings["reference"] == "precompute"}


def dataset(rows: list[dict[str, Any]]):
    from datasets import Dataset

    return Dataset.from_list([{"id": str(r["id"]), "prompt": r["prompt"], "completion": r["completion"],
                               "label": bool(r["label"])} for r in rows])


def build_trainer(model: Any, tokenizer: Any, config: Any, train: Any, evals: Any, callbacks: list[Any],
                  ref_model: Any = None, **extra: Any):
    from trl import KTOTrainer

    trainer = KTOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=train, eval_dataset=evals,
                         processing_class=tokenizer, callbacks=callbacks)
    drop_reference_adapter(trainer.model)
    return trainer


def _label_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    desirable = sum(1 for r in rows if r["label"])
    return {"train_desirable": desirable, "train_undesirable": len(rows) - desirable}


def prepare(s: Any, paths: Any, section: dict[str, Any]) -> Plan:
    return prepare_preference(s, paths, section, NAME, counts=_label_counts, dataset_fn=dataset)
