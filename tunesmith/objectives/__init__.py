"""Training objectives: what a model is trained for. One module per objective, one entry here.

A module defines
- NAME, and INPUTS: the train rule's inputs it reads, as files of the recipe's data folder
  ({"train": "train.jsonl", "eval": "eval.jsonl"} for sft; {"train": "pairs.jsonl"} for dpo);
  the workflow asks this registry for them (workflow/rules/common.smk, train_inputs);
- prepare(setup, paths, section) -> Plan: its reader, its checks and contract gate, its trainer's
  extra arguments and the figures it adds to metrics.json, all before the model loads;
- config_class() (its TrainingArguments class), config_kwargs(args, settings) (the arguments only
  it has, from train.args and its own recipe section, e.g. train.dpo), dataset(rows) and
  build_trainer(model, tokenizer, config, train, eval, callbacks, **extra) (extra: what only its
  trainer takes, e.g. GRPO's reward functions);
- HISTORIES: the step figures it logs beside the loss (rewards/margins, reward, ...), which the
  loop keeps, writes and plots.
tunesmith.training.train runs every objective the same way through the one loop (tunesmith.trainer).

`train.objective` in the recipe schema lists the objectives a recipe's train section can pick
(a test holds them equal to this registry less causal-lm, which `kind: pretrain` selects).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

from tunesmith.errors import TunesmithError

OBJECTIVES = {
    "sft": "tunesmith.objectives.sft",
    "causal-lm": "tunesmith.objectives.causal_lm",
    "dpo": "tunesmith.objectives.dpo",
    "kto": "tunesmith.objectives.kto",
    "grpo": "tunesmith.objectives.grpo",
}


@dataclass
class Plan:
    """What an objective's prepare() hands the loop."""

    train: Any                                  # the trainer's train dataset
    eval: Any | None = None                     # and its eval dataset (None: no held-out rows)
    before_train: Callable[[Any], None] | None = None  # (trainer) -> the contract gate, on the trainer's collator
    # extra arguments of build_trainer; a callable gets the loaded model first (a reference model loads after it)
    trainer_kwargs: dict[str, Any] | Callable[[Any], dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # figures it adds to metrics.json
    settings: dict[str, Any] | None = None      # its own recipe section (train.dpo ...); set: plot HISTORIES


def get(name: str) -> ModuleType:
    if name not in OBJECTIVES:
        raise TunesmithError(f"train.objective '{name}' is unknown; known: {', '.join(OBJECTIVES)}")
    return importlib.import_module(OBJECTIVES[name])


def inputs(name: str) -> dict[str, str]:
    """The train rule's inputs for objective `name`: {input name: file of the recipe's data folder}."""
    return dict(get(name).INPUTS)
