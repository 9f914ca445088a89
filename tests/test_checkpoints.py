"""Checkpoint recovery: a checkpoint cut short (full disk, node crash) is set aside with a one-line
reason and training resumes from the previous good one, or from scratch when none is left."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from tunesmith import checkpoints

CUT = ("adapter_model.safetensors", "optimizer.pt", "trainer_state.json")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir):
    """A 4-step LoRA run of the tiny Llama with checkpoints at steps 2 and 4."""
    from conftest import train_section, write_sft_data

    from tunesmith.training import TrainPaths, train

    tmp = tmp_path_factory.mktemp("ckpt")
    data = write_sft_data(tmp / "data", n_train=16, n_eval=4)
    section = train_section("lora", max_steps=4, save_steps=2, save_total_limit=3)
    paths = TrainPaths(base=str(tiny_llama_dir), model=str(tmp / "model"), metrics=str(tmp / "train/metrics.json"),
                     loss=str(tmp / "train/loss.png"), **data)
    train(paths, section)
    assert sorted(p.name for p in paths.checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    return paths, section


@pytest.mark.parametrize("name", CUT)
def test_a_truncated_file_sets_the_checkpoint_aside(trained, tmp_path, name, caplog):
    paths, _ = trained
    folder = shutil.copytree(paths.checkpoints, tmp_path / "checkpoints")
    victim = folder / "checkpoint-4" / name
    victim.write_bytes(victim.read_bytes()[: max(1, victim.stat().st_size // 3)])
    with caplog.at_level(logging.WARNING, logger="tunesmith.train"):
        assert checkpoints.last_checkpoint(folder) == folder / "checkpoint-2"
    assert (folder / "checkpoint-4.corrupt" / name).is_file()
    assert name in caplog.text and "checkpoint-4.corrupt" in caplog.text
    # Both cut: nothing is left to resume from, and nothing crashes.
    victim = folder / "checkpoint-2" / name
    victim.write_bytes(b"")
    assert checkpoints.last_checkpoint(folder) is None
    assert (folder / "checkpoint-2.corrupt").is_dir()


def test_training_resumes_from_the_previous_good_checkpoint(trained, tmp_path):
    from tunesmith.training import TrainPaths, train

    paths, section = trained
    run = tmp_path / "run"
    shutil.copytree(Path(paths.metrics).parent, run / "train")
    state = run / "train/checkpoints/checkpoint-4/trainer_state.json"
    state.write_text(state.read_text()[:40])  # cut mid-write
    again = TrainPaths(train=paths.train, eval=paths.eval, template=paths.template, base=paths.base,
                     model=str(run / "model"), metrics=str(run / "train/metrics.json"), loss=str(run / "train/loss.png"))
    train(again, section)
    metrics = json.loads((run / "train/metrics.json").read_text())
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 4
    assert (run / "train/checkpoints/checkpoint-4.corrupt").is_dir()


def test_a_rerun_of_a_finished_run_trains_no_step_past_max_steps(trained, tmp_path):
    """The workflow reruns train when an input was rewritten unchanged: the checkpoint at max_steps
    is the result. transformers would resume it and take a fifth step before it checks; with a
    cosine schedule that step moves the weights."""
    from safetensors.numpy import load_file

    from tunesmith.training import TrainPaths, train

    paths, section = trained
    run = tmp_path / "run"
    shutil.copytree(Path(paths.metrics).parent, run / "train")
    again = TrainPaths(train=paths.train, eval=paths.eval, template=paths.template, base=paths.base,
                       model=str(run / "model"), metrics=str(run / "train/metrics.json"),
                       loss=str(run / "train/loss.png"))
    train(again, section)
    metrics = json.loads((run / "train/metrics.json").read_text())
    assert (metrics["steps"], metrics["steps_this_run"], metrics["resumed_from_step"]) == (4, 0, 4)
    before = load_file(str(run / "train/checkpoints/checkpoint-4/adapter_model.safetensors"))
    after = load_file(str(run / "model/adapter_model.safetensors"))
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)
    assert metrics["train_loss_first"] is not None and metrics["eval_loss"] is not None


# ------------------------------------------------ what a checkpoint must match (issue 27)

def test_every_train_key_of_the_schema_is_classified():
    from tunesmith.schema import load_schema

    schema = load_schema("recipe")
    keys = set(schema["properties"]["train"]["properties"])
    assert keys == set(checkpoints.TRAIN_KEYS), "classify each train.* key in checkpoints.TRAIN_KEYS"
    assert set(checkpoints.TRAIN_KEYS.values()) == {"optimisation", "merge", "scheduling"}
    args = set(schema["$defs"]["training_args"]["properties"])
    assert set(checkpoints.ARGS_CADENCE + checkpoints.ARGS_COMPUTE) <= args


def _edited(section, dotted, value):
    import copy

    out = copy.deepcopy(section)
    *path, last = dotted.split(".")
    node = out
    for key in path:
        node = node[key]
    node[last] = value
    return out


KEEPS = [("train.runtime", 600), ("train.mem_mb", 32000), ("train.gpu_model", "h100"),
         ("train.sample_prompts", ["other"]), ("train.merge_tolerance", 0.5), ("train.sample_eval_rows", 3),
         ("train.args.logging_steps", 50), ("train.args.save_steps", 7), ("train.args.eval_steps", 3),
         ("train.args.save_total_limit", 9), ("train.args.gradient_checkpointing", True),
         ("train.args.per_device_eval_batch_size", 2)]
CHANGES = [("train.args.learning_rate", 0.5), ("train.lora.r", 4), ("train.method", "full"),
           ("train.args.max_steps", 9), ("model.dtype", "bfloat16"), ("model.revision", "abc")]


@pytest.mark.parametrize(("key", "value"), KEEPS)
def test_a_scheduling_or_cadence_edit_keeps_the_checkpoints(trained, tmp_path, key, value, caplog):
    """Before: raising train.runtime after a SLURM timeout changed the fingerprint and rmtree'd them."""
    from tunesmith.training import _fingerprint

    paths, section = trained
    folder = shutil.copytree(paths.checkpoints, tmp_path / "checkpoints")
    with caplog.at_level(logging.WARNING, logger="tunesmith.train"):
        assert checkpoints.prepare_checkpoints(folder, _fingerprint(paths, _edited(section, key, value))) \
            == folder / "checkpoint-4"
    assert "step 0" not in caplog.text


@pytest.mark.parametrize(("key", "value"), CHANGES)
def test_an_optimisation_edit_sets_the_checkpoints_aside(trained, tmp_path, key, value):
    from tunesmith.training import _fingerprint

    paths, section = trained
    folder = shutil.copytree(paths.checkpoints, tmp_path / "checkpoints")
    assert checkpoints.prepare_checkpoints(folder, _fingerprint(paths, _edited(section, key, value))) is None
    # Renamed, not deleted: reverting the edit can bring them back by hand.
    assert (tmp_path / "checkpoints.stale-1" / "checkpoint-4" / "trainer_state.json").is_file()
    assert not any(folder.glob("checkpoint-*"))


def test_only_the_newest_stale_sets_are_kept(tmp_path):
    folder = tmp_path / "checkpoints"
    for n in range(checkpoints.STALE_KEPT + 2):
        (folder / "checkpoint-2").mkdir(parents=True)
        checkpoints.prepare_checkpoints(folder, f"fp{n}")
    stale = sorted(p.name for p in tmp_path.glob("checkpoints.stale-*"))
    assert stale == [f"checkpoints.stale-{n}" for n in range(3, checkpoints.STALE_KEPT + 3)]


def test_train_params_leave_out_merge_and_scheduling_keys():
    """The train rule's params: a merge-only or scheduling key reruns no training."""
    from conftest import train_section

    train = train_section()["train"]
    for_train = checkpoints.stage_train_section(train, "train")
    for_merge = checkpoints.stage_train_section(train, "merge")
    assert not {"sample_prompts", "merge_tolerance", "runtime", "mem_mb", "gpu_model"} & set(for_train)
    assert {"sample_prompts", "merge_tolerance", "method", "lora", "quantization"} <= set(for_merge)
    assert not {"runtime", "mem_mb", "gpu_model"} & set(for_merge)
