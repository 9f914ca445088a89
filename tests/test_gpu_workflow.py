"""bench/gpu_workflow.py, the two GPU seed recipes through Snakemake offline: its overlay must stay a
valid config for the recipes as they are (fast), and its --tiny run passes every check on a CPU
(slow: its workflow took 22 min on the 2-core machine under load 11-17, 2026-12-04; not timed quiet)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_workflow", REPO / "bench" / "gpu_workflow.py")
gw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gw)


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("tiny", [True, False])
def test_overlay_is_a_valid_config_for_both_recipes(tmp_path, tiny, cuda):
    from tunesmith.recipe import check_config, load_recipe

    args = argparse.Namespace(tiny=tiny, steps=30, tracking_uri=None)
    bases = {"llama2": tmp_path / "llama2", "llama3": tmp_path / "llama3"}
    data = {"platypus": tmp_path / "p.jsonl", "dolly": tmp_path / "d.jsonl"}
    cfg, notes = gw.overlay(args, bases, data, cuda)
    cfg = check_config(cfg, "overlay")
    recipes = {n: load_recipe(REPO / "recipes" / f"{n}.yaml", cfg["overrides"][n]) for n in gw.RECIPES}
    platypus, dolly = recipes["platypus-llama2-qlora"], recipes["dolly-pirate-llama3.2-unsloth"]
    assert platypus["train"]["method"] == "qlora" and platypus["model"]["base"] == str(bases["llama2"])
    assert platypus["train"]["quantization"]["quant_type"] == "nf4"  # the recipe's own settings stay
    assert dolly["train"]["method"] == ("unsloth" if cuda else "lora")
    assert ("unsloth -> lora" in " ".join(notes)) is not cuda
    # both GPU jobs ask for the GPU, so the claim is exercised on a CPU too
    assert platypus["train"]["gpus"] == dolly["train"]["gpus"] == 1


def test_most_at_once_counts_overlapping_jobs():
    assert gw.most_at_once([(0, 1, "a"), (1, 2, "b"), (2, 3, "c")]) == 1  # back to back is not overlap
    assert gw.most_at_once([(0, 2, "a"), (1, 3, "b")]) == 2


def test_real_shapes_are_the_published_configs():
    args = argparse.Namespace(tiny=False, llama2_layers=32, llama2_hidden=4096)
    s = gw.shapes(args)
    assert (s["llama2"]["hidden_size"], s["llama2"]["intermediate_size"], s["llama2"]["num_attention_heads"]) == \
        (4096, 11008, 32)
    assert s["llama3"]["num_key_value_heads"] == 8 and s["llama3"]["tie_word_embeddings"] is True


@pytest.mark.slow
def test_tiny_run_passes_every_check(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_workflow.py"), "--tiny", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=3000, env=env)
    summary = json.loads((tmp_path / "gpu_workflow.json").read_text()) if (tmp_path / "gpu_workflow.json").exists() else {}
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert summary["failures"] == [] and summary["cuda"] is False
    assert len(summary["gpu_jobs"]) == 6
