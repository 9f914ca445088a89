"""Training objectives: what a model is trained for. One module per objective, one entry here.

A module defines NAME, config_class() (its TrainingArguments class), config_kwargs(args, settings)
(the arguments only it has, from train.args and its own recipe section, e.g. train.dpo),
dataset(rows) and build_trainer(model, tokenizer, config, train, eval, callbacks, **extra) (extra:
what only its trainer takes, e.g. GRPO's reward functions); HISTORIES names the step figures it
logs beside the loss (rewards/margins, reward, ...), which the loop keeps, writes and plots. Its
stage function (tunesmith.training) prepares the datasets and hands them to the one loop in
tunesmith.trainer.

`train.objective` in the recipe schema lists the objectives a recipe's train section can pick
(a test holds them equal to this registry less causal-lm, which `kind: pretrain` selects).
"""

from __future__ import annotations

import importlib
from types import ModuleType

OBJECTIVES = {
    "sft": "tunesmith.objectives.sft",
    "causal-lm": "tunesmith.objectives.causal_lm",
    "dpo": "tunesmith.objectives.dpo",
    "kto": "tunesmith.objectives.kto",
    "grpo": "tunesmith.objectives.grpo",
}


def get(name: str) -> ModuleType:
    from tunesmith.errors import TunesmithError

    if name not in OBJECTIVES:
        raise TunesmithError(f"train.objective '{name}' is unknown; known: {', '.join(OBJECTIVES)}")
    return importlib.import_module(OBJECTIVES[name])
