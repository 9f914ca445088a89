"""Direct preference optimisation (trl's DPOTrainer) on chosen/rejected pairs.

Rows are conversational {id, prompt, chosen, rejected} (tunesmith.data.preference); trl renders
them with the chat template and tokenises them itself. The pair contract gate
(tunesmith.contract.pair_gate) checks the same rendering, and the trainer's own collator, before
step one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tunesmith import contract, methods
from tunesmith.data import preference
from tunesmith.errors import TunesmithError
from tunesmith.objectives import Plan

log = logging.getLogger("tunesmith.train")

NAME = "dpo"
# Files of the recipe's data folder the train rule reads: the curated pairs.
INPUTS = {"train": "pairs.jsonl"}
# What DPOTrainer logs beside the loss; the loop keeps them as step histories and plots them.
HISTORIES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected")
LOSS_IS_NLL = False  # its loss is no token NLL: the loop reports no perplexity
HEADLINE = ("rewards/accuracies", "rewards/margins")  # last values, in the stage's one-line summary


def config_class():
    from trl import DPOConfig

    return DPOConfig


def config_kwargs(args: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    return {"max_length": args["max_length"], "beta": settings["beta"], "loss_type": [settings["loss_type"]],
            "label_smoothing": settings["label_smoothing"],
            "precompute_ref_log_probs": settings["reference"] == "precompute"}


def dataset(rows: list[dict[str, Any]]):
    from datasets import Dataset

    return Dataset.from_list([{"id": str(r["id"]), "prompt": r["prompt"], "chosen": r["chosen"],
                               "rejected": r["rejected"]} for r in rows])


def build_trainer(model: Any, tokenizer: Any, config: Any, train: Any, evals: Any, callbacks: list[Any],
                  ref_model: Any = None, **extra: Any):
    from trl import DPOTrainer

    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=train, eval_dataset=evals,
                         processing_class=tokenizer, callbacks=callbacks)
    drop_reference_adapter(trainer.model)
    return trainer


def drop_reference_adapter(model: Any) -> None:
    """trl copies a PeftModel's adapter into a frozen 'ref' adapter to serve as the reference. Our
    adapter is always freshly initialised (LoRA's B = 0), so it adds nothing to the base: without
    the copy trl falls back to the base with adapters disabled, the same reference at no extra
    memory, and the saved folder holds only the adapter that trained."""
    config = getattr(model, "peft_config", None)
    if isinstance(config, dict) and "ref" in config:
        model.delete_adapter("ref")


def read_rows(path: str, objective: str) -> list[dict[str, Any]]:
    """Canonical rows for dpo (pairs) or kto (unpaired rows; pairs are split into one of each label)."""
    rows, info = preference.load_preference(path)
    if objective == "kto":
        return preference.unpair(rows)
    if info["kind"] != "pairs":
        raise TunesmithError(f"{path}: train.objective dpo needs chosen/rejected pairs, but this file holds "
                             f"{info['layout']} rows (prompt/completion/label); use objective kto for them")
    return rows


def prepare_preference(s: Any, paths: Any, section: dict[str, Any], name: str, counts: dict[str, int] | None = None,
                       dataset_fn: Any = None) -> Plan:
    """dpo or kto: canonical preference rows, the pair contract gate, and the reference model (full
    fine-tuning: a second frozen copy of the base; adapter methods disable their adapter instead)."""
    args, tokenizer, settings = s.args, s.tokenizer, section["train"][name]
    train_rows = read_rows(paths.train, name)
    eval_rows = read_rows(paths.eval, name) if paths.eval and Path(paths.eval).is_file() else []

    def gate(trainer: Any) -> None:
        gen = getattr(trainer.model, "generation_config", None)
        for split, rows, batch in (("train", train_rows, args["per_device_train_batch_size"]),
                                   ("eval", eval_rows, args["per_device_eval_batch_size"])):
            if rows:
                contract.pair_gate(rows, tokenizer, collator=trainer.data_collator, generation_config=gen,
                                   max_length=args["max_length"], batch_size=batch, name=split)
        log.info("pair contract passed: %d train and %d eval rows; every prompt renders the same before each "
                 "completion, and each completion ends with a supervised %r", len(train_rows), len(eval_rows),
                 tokenizer.eos_token)

    def trainer_kwargs(model: Any) -> dict[str, Any]:
        ref_model = None
        if settings["reference"] == "model" and not s.method.adapter:
            ref_model = methods.load_reference(paths.base, section, s.cuda, tokenizer, s.grow_vocab)
        return {"ref_model": ref_model}

    make = dataset_fn or dataset
    return Plan(train=make(train_rows), eval=make(eval_rows) if eval_rows else None, before_train=gate,
                trainer_kwargs=trainer_kwargs, settings=settings,
                metrics={"beta": settings["beta"], "loss_type": settings["loss_type"],
                         "reference": settings["reference"],
                         **(counts(train_rows) if counts else {"train_pairs": len(train_rows)})})


def prepare(s: Any, paths: Any, section: dict[str, Any]) -> Plan:
    return prepare_preference(s, paths, section, NAME)
