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
