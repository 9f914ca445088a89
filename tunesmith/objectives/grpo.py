"""Group relative policy optimisation (trl's GRPOTrainer): the model samples completions for each
prompt, verifiable rewards (tunesmith.rewards) score them, and each is pushed up or down against
its group.

Rows are conversational {id, prompt, answer}; every column but the prompt reaches the reward
functions as a keyword (trl's calling convention), so 'answer' is the reference they compare with.
"""

from __future__ import annotations

from typing import Any

from tunesmith import contract, ranks, rewards
from tunesmith.data import preference
from tunesmith.errors import TunesmithError
from tunesmith.objectives import Plan
from tunesmith.objectives.dpo import drop_reference_adapter

NAME = "grpo"
# Files of the recipe's data folder the train rule reads: the format stage's prompts, whose
# completions are the reference answers the rewards compare with.
INPUTS = {"train": "train.jsonl"}
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


def prepare(s: Any, paths: Any, section: dict[str, Any]) -> Plan:
    """Prompts with reference answers; the recipe's rewards (checked by name here) score the completions
    the model samples."""
    settings = section["train"]["grpo"]
    args = section["train"]["args"]
    per_step = args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] * ranks.world_size()
    if per_step % settings["num_generations"]:
        raise TunesmithError(f"train.grpo.num_generations ({settings['num_generations']}) must divide the completions "
                             f"per optimizer step, train.args.per_device_train_batch_size x gradient_accumulation_steps "
                             f"(x GPUs) = {per_step}: each step scores whole groups")
    weights = settings["reward_weights"]
    if weights is not None and len(weights) != len(settings["rewards"]):
        raise TunesmithError(f"train.grpo.reward_weights has {len(weights)} weights for {len(settings['rewards'])} "
                             f"rewards ({', '.join(settings['rewards'])})")
    funcs = rewards.resolve(settings["rewards"], settings["format_pattern"])
    if settings["beta"] > 0 and not s.method.adapter and s.grow_vocab:
        raise TunesmithError("train.grpo.beta > 0 with method full loads the reference from the base folder, whose "
                             "vocabulary lacks the pad token added here; set model.pad_token to a token the "
                             "tokenizer has, or beta: 0")
    rows = preference.load_prompts(paths.train, settings["answer_field"])
    contract.prompt_gate(rows, s.tokenizer)
    return Plan(train=dataset(rows), trainer_kwargs={"reward_funcs": funcs}, settings=settings,
                metrics={"rewards": list(settings["rewards"]), "num_generations": settings["num_generations"],
                         "train_prompts": len(rows)})
