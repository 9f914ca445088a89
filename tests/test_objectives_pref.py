"""dpo, kto and grpo through the one trainer loop, on the tiny random Llama (CPU, a few steps):
the reward histories reach metrics.json, the Result and a plot, and the reference is the model
training starts from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import SMOLLM2_DIR, reverse_rows

from tunesmith.data.preference import write_rows
from tunesmith.errors import TunesmithError
from tunesmith.schema import load_schema

PAIR_HISTORIES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def reverse_pairs(n: int, seed: int) -> list[dict]:
    """chosen: the words reversed (the reference answer); rejected: the words in their given order."""
    out = []
    for r in reverse_rows(n, seed):
        words = r["prompt"][-1]["content"].split(": ", 1)[1]
        out.append({"id": r["id"], "prompt": r["prompt"], "chosen": r["completion"],
                    "rejected": [{"role": "assistant", "content": words}]})
    return out


def word_count_reward(prompts, completions, **kwargs):
    """A custom reward named by dotted path in the grpo test: varies between completions, so the
    group advantages are not all zero even for a random model."""
    return [float(len(c[-1]["content"].split())) for c in completions]


def paths_for(tmp: Path, n_train: int = 8, n_eval: int = 4, objective: str = "dpo"):
    from tunesmith.training import TrainPaths

    data = tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "chat_template.jinja").write_text((SMOLLM2_DIR / "chat_template.jinja").read_text())
    if objective == "grpo":  # the format stage's prompt/completion rows: the completion is the reference answer
        (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reverse_rows(n_train, 1)))
    else:
        write_rows(data / "train.jsonl", reverse_pairs(n_train, 1))
        if n_eval:
            write_rows(data / "eval.jsonl", reverse_pairs(n_eval, 2))
    run = tmp / "run"
    return TrainPaths(train=str(data / "train.jsonl"), eval=str(data / "eval.jsonl") if n_eval else "",
                          template=str(data / "chat_template.jinja"), base="", model=str(run / "model/trained"),
                          metrics=str(run / "train/metrics.json"), loss=str(run / "train/loss.png"),
                          plot=str(run / "train/rewards.png"))


def curve(metrics: dict, name: str) -> list[tuple[int, float]]:
    return [(p["step"], p["value"]) for p in metrics["histories"][name]]


def test_every_objective_setting_has_a_description_and_a_default():
    train = load_schema("recipe")["properties"]["train"]["properties"]
    assert train["objective"]["enum"] == ["sft", "dpo", "kto", "grpo"]
    for name in ("dpo", "kto", "grpo"):
        for key, spec in train[name]["properties"].items():
            assert spec.get("description") and "default" in spec, f"train.{name}.{key}"
    assert "rights of the user" in train["grpo"]["properties"]["rewards"]["description"]


def test_dpo_lora_trains_and_records_reward_histories(tmp_path, tiny_llama_dir, section_factory, caplog):
    import logging

    from tunesmith.training import train

    caplog.set_level(logging.INFO, logger="tunesmith.train")
    section = section_factory("lora", max_steps=3, per_device_train_batch_size=4, save_steps=10)
    section["train"]["objective"] = "dpo"
    paths = paths_for(tmp_path)
    paths.base = str(tiny_llama_dir)
    result = train(paths, section)

    metrics = json.loads(Path(paths.metrics).read_text())
    assert metrics["objective"] == "dpo" and metrics["method"] == "lora" and metrics["steps"] == 3
    assert metrics["train_pairs"] == 8 and metrics["beta"] == 0.1 and metrics["reference"] == "model"
    assert all(math.isfinite(p["loss"]) for p in metrics["loss_history"])
    for name in PAIR_HISTORIES + ("logps/chosen", "logps/rejected"):
        assert [s for s, _ in curve(metrics, name)] == [1, 2, 3], name
        assert result.histories[name] == curve(metrics, name)
    assert all(0.0 <= v <= 1.0 for _, v in curve(metrics, "rewards/accuracies"))
    # The reference is the base with the adapter disabled: at step 1 the fresh adapter adds nothing,
    # so both rewards are exactly 0 and the held-out loss is log 2; after two updates they are not.
    assert curve(metrics, "rewards/chosen")[0][1] == 0.0 and curve(metrics, "rewards/rejected")[0][1] == 0.0
    assert metrics["eval_loss_initial"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["eval_perplexity"] is None  # exp(DPO loss) is no perplexity
    assert metrics["eval_rewards/accuracies_initial"] == 0.0 and 0.0 <= metrics["eval_rewards/accuracies"] <= 1.0
    assert metrics["eval_rewards/margins_initial"] == 0.0 and metrics["eval_rewards/margins"] != 0.0
    assert curve(metrics, "rewards/margins")[-1][1] != 0.0
    assert curve(metrics, "logps/chosen")[-1][1] != curve(metrics, "logps/chosen")[0][1]
    assert metrics["rewards/margins_last"] == curve(metrics, "rewards/margins")[-1][1]
    assert Path(paths.plot).read_bytes()[:4] == b"\x89PNG" and paths.plot in result.artifacts
    trained = Path(paths.model)
    assert (trained / "adapter_model.safetensors").is_file() and not (trained / "ref").exists()
    assert json.loads((trained / "tunesmith_train.json").read_text())["objective"] == "dpo"
    assert "pair contract passed: 8 train and 4 eval rows" in caplog.text
    assert result.summary.startswith("dpo/lora on cpu: loss 0.6931 -> ") and ", rewards/accuracies " in result.summary


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_dpo_on_the_other_methods(tmp_path, tiny_llama_dir, section_factory, method):
    from tunesmith.training import train

    section = section_factory(method, max_steps=2, per_device_train_batch_size=4, save_steps=10)
    section["train"]["objective"] = "dpo"
    paths = paths_for(tmp_path, n_eval=0)
    paths.base = str(tiny_llama_dir)
    metrics = train(paths, section).metrics
    assert metrics["method"] == method and metrics["steps"] == 2
    assert math.isfinite(metrics["train_loss_last"])
    # full: a second frozen copy of the base is the reference; qlora: its 4-bit base with the adapter
    # disabled. Either way the policy starts equal to it.
    assert metrics["rewards/chosen_first"] == 0.0 and 0.0 <= metrics["rewards/accuracies_last"] <= 1.0
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert (Path(paths.model) / weights).is_file()


def test_kto_lora_splits_pairs_and_records_histories(tmp_path, tiny_llama_dir, section_factory):
    from tunesmith.training import train

    section = section_factory("lora", max_steps=2, per_device_train_batch_size=4, save_steps=10)
    section["train"]["objective"] = "kto"
    paths = paths_for(tmp_path, n_eval=0)
    paths.base = str(tiny_llama_dir)
    result = train(paths, section)
    metrics = json.loads(Path(paths.metrics).read_text())
    assert metrics["objective"] == "kto" and metrics["steps"] == 2 and metrics["train_rows"] == 16
    assert metrics["train_desirable"] == 8 and metrics["train_undesirable"] == 8
    for name in ("rewards/chosen", "rewards/rejected", "kl"):
        assert [s for s, _ in curve(metrics, name)] == [1, 2], name
    assert math.isfinite(metrics["train_loss_last"]) and "kl" in result.histories


def test_grpo_lora_samples_scores_and_records_the_reward(tmp_path, tiny_llama_dir, section_factory):
    from tunesmith.training import train

    section = section_factory("lora", max_steps=2, per_device_train_batch_size=2, save_steps=10)
    section["train"]["objective"] = "grpo"
    section["train"]["grpo"].update(num_generations=2, max_completion_length=8,
                                    rewards=["exact_match", "test_objectives_pref:word_count_reward"])
    paths = paths_for(tmp_path, objective="grpo", n_eval=0)
    paths.base = str(tiny_llama_dir)
    result = train(paths, section)
    metrics = json.loads(Path(paths.metrics).read_text())
    assert metrics["objective"] == "grpo" and metrics["steps"] == 2 and metrics["train_prompts"] == 8
    for name in ("reward", "reward_std", "completions/mean_length", "rewards/exact_match/mean",
                 "rewards/word_count_reward/mean"):
        assert [s for s, _ in curve(metrics, name)] == [1, 2], name
        assert name in result.histories
    assert all(0.0 <= v <= 1.0 for _, v in curve(metrics, "rewards/exact_match/mean"))
    assert all(0 < v <= 8 for _, v in curve(metrics, "completions/mean_length"))
    # reward = exact_match + word count: the sum trl logs is the two functions' means added.
    for (_, total), (_, em), (_, wc) in zip(curve(metrics, "reward"), curve(metrics, "rewards/exact_match/mean"),
                                            curve(metrics, "rewards/word_count_reward/mean")):
        assert total == pytest.approx(em + wc, rel=1e-5)
    assert math.isfinite(metrics["train_loss_last"])
    assert (Path(paths.model) / "adapter_model.safetensors").is_file()
    assert ", reward " in result.summary


def test_misfits_are_named_before_training(tmp_path, tiny_llama_dir, section_factory):
    from tunesmith.training import train

    section = section_factory("lora", max_steps=1, per_device_train_batch_size=4)
    section["train"]["objective"] = "dpo"
    paths = paths_for(tmp_path, n_eval=0)
    paths.base = str(tiny_llama_dir)
    Path(paths.train).write_text(json.dumps({"prompt": "p", "completion": "c", "label": True}) + "\n")
    with pytest.raises(TunesmithError, match=r"dpo needs chosen/rejected pairs, but this file holds kto rows"):
        train(paths, section)
    section["train"]["objective"] = "grpo"
    section["train"]["grpo"]["num_generations"] = 3
    with pytest.raises(TunesmithError, match=r"num_generations \(3\) must divide the completions per optimizer "
                                             r"step.* = 4"):
        train(paths, section)
    section["train"]["grpo"].update(num_generations=2, rewards=["exact_mach"])
    with pytest.raises(TunesmithError, match=r"did you mean 'exact_match'"):
        train(paths, section)
