"""Group relative policy optimisation (trl's GRPOTrainer): the model samples completions for each
prompt, verifiable rewards (tunesmith.rewards) score them, and each is pushed up or down against
its group.

Rows are conversational {id, prompt, answer}; every column but the prompt reaches the reward
functions as a keyword (trl's calling convention), so 'answer' is the reference they compare with.
"""

from __future__ import annotations

from typing import Any

from tunesmith.objectives.dpo import drop_reference_adapter

NAME = "grpo"
# reward = the weighted sum of the rewards, averaged over the step's completions; rewards/ holds
# each function's own mean and std.
HISTORIES = ("reward", "reward_std", "completions/mean_length", "completions/clipped_ratio",
             "frac_reward_zero_std", "rewards/")
LOSS_IS_NLL = False  # its loss is no token NLL: the loop reports no perplexity
HEADLINE = ("reward", "completions/mean_length")  # last values, in the stage's one-line summary


def config_class():
    from trl import GRPOConfig

    return GRPOConfig


def config_kwargs(args: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    return {key: settings[key] for key in ("num_generations", "max_completion_length", "temperature", "top_p", "beta",
                                           "loss_type", "scale_rewards", "num_iterations", "epsilon",
                                           "reward_weights")}


def dataset(rows: list[dict[str, Any]]):
    from datasets import Dataset

    return Dataset.from_list([{"id": str(r["id"]), "prompt": r["prompt"], "answer": r["answer"]} for r in rows])


def build_trainer(model: Any, tokenizer: Any, config: Any, train: Any, evals: Any, callbacks: list[Any],
                  reward_funcs: list[Any] | None = None, **extra: Any):
    from trl import GRPOTrainer

    trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=config, train_dataset=train,
                          eval_dataset=evals, processing_class=tokenizer, callbacks=callbacks)
    drop_reference_adapter(trainer.model)
    return trainer
