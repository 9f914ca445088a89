"""Direct preference optimisation (trl's DPOTrainer) on chosen/rejected pairs.

Rows are conversational {id, prompt, chosen, rejected} (tunesmith.data.preference); trl renders
them with the chat template and tokenises them itself. The pair contract gate
(tunesmith.contract.pair_gate) checks the same rendering, and the trainer's own collator, before
step one.
"""

from __future__ import annotations

from typing import Any

NAME = "dpo"
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
