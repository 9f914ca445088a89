"""The seed recipes outside their home hardware: hub-only inputs and GPU-only methods stop with
messages a person can act on, and the two CPU-feasible recipes run end to end (reduced by
tests/configs/cpu.yaml, never by editing the recipes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from workflow_helpers import REPO, SHARED, failure_text, make_workdir, read_json, snakemake, write_config



def test_hub_dataset_and_model_offline_say_what_and_how(tmp_path):
    work = make_workdir(tmp_path)
    config = write_config(work, {"recipes": ["platypus-llama2-qlora"], "offline": True})
    proc = snakemake(work, config, "--keep-going", "results/platypus-llama2-qlora/data/raw.parquet",
                     "resources/models/NousResearch--Llama-2-7b-hf", timeout=600)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr + "".join(p.read_text() for p in (work / "logs").rglob("*.log"))
    assert "garage-bAInd/Open-Platypus" in out and "offline" in out
    assert "dataset.source" in out  # how to point the recipe at a local copy
    assert "NousResearch/Llama-2-7b-hf" in out and "model.base" in out
    assert "Traceback" not in proc.stderr


def test_unsloth_without_cuda_names_the_method_and_the_cpu_alternative(tmp_path, tiny_llama_dir, sft_data):
    """The unsloth recipe's resolved train section, run by hand through the stage script (scripts/stage.py train) on a CPU,
    stops before loading anything, saying why and what runs instead (qlora runs on CPU since
    bitsandbytes 0.50: tests/test_train_sft.py trains it). That such a message reaches the terminal
    of a plain `snakemake` is tests/test_faults.py's case."""
    from tunesmith.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "dolly-pirate-llama3.2-unsloth.yaml")
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"section": {"model": recipe["model"], "train": recipe["train"]}}))
    run = tmp_path / "results/r/main"
    cmd = [sys.executable, "-P", str(REPO / "scripts" / "stage.py"), "train", "--params", str(params),
           "--log", str(tmp_path / "train.log"), *[f"--input={k}={v}" for k, v in sft_data.items()],
           f"--input=base={tiny_llama_dir}", f"--output=model={run / 'model/trained'}",
           f"--output=metrics={run / 'train/metrics.json'}", f"--output=loss={run / 'train/loss.png'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    terminal = proc.stdout + proc.stderr
    assert "tunesmith error:" in terminal and "Traceback" not in terminal, terminal[-3000:]
    assert "CUDA" in terminal and "unsloth" in terminal and "method: lora" in terminal, terminal[-3000:]
    assert "CUDA" in (tmp_path / "train.log").read_text()
    assert not (run / "model" / "trained").exists()


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason=f"real datasets not available: {SHARED} is absent")
def test_seed_recipes_run_end_to_end_on_cpu(tmp_path, llama256_dir):
    """One workflow, three seed recipes reduced by tests/configs/cpu.yaml:
    - gsm8k-smollm2-lora: a plumbing check of GSM8K's data, its lm-eval task and its GGUF on a
      random 2-layer Llama with SmolLM2's tokenizer;
    - scratch-llama: its tokenizer, pretraining and SFT as the recipe has them;
    - platypus-llama2-qlora: the recipe's QLoRA (nf4, double quantisation, paged 8-bit AdamW, LoRA
      on every linear layer) on the default model over GPTeacher codegen, merged into the 16-bit
      base, quantized and scored base -> tuned -> Q4_K_M. Code answers never match exactly; the
      reference answers' log-likelihood says whether tuning helped."""
    work = make_workdir(tmp_path)
    cfg = yaml.safe_load((REPO / "tests" / "configs" / "cpu.yaml").read_text())
    cfg["tracking"] = {"enabled": False}
    cfg["overrides"]["gsm8k-smollm2-lora"]["model"] = {"base": str(llama256_dir)}
    config = write_config(work, cfg)
    proc = snakemake(work, config, timeout=3600)
    assert proc.returncode == 0, failure_text(proc, work)
    for recipe in cfg["recipes"]:
        out = work / "results" / recipe / "main"
        compare = read_json(out / "eval" / "compare.json")
        assert compare["tasks"], recipe
        for task in compare["tasks"].values():
            assert task["base"] is not None and task["tuned"] is not None
        report = read_json(out / "gguf" / "report.json")
        assert report["files"], recipe
        for name, info in report["files"].items():
            assert info["size_bytes"] > 0 and info["smoke_text"] is not None, (recipe, name)
    gsm = read_json(work / "results" / "gsm8k-smollm2-lora" / "main" / "eval" / "compare.json")
    assert "gsm8k_local" in gsm["tasks"] and gsm["tasks"]["gsm8k_local"]["limit"] == 5
    print(json.dumps(gsm, indent=1))

    qlora = work / "results" / "platypus-llama2-qlora" / "main"
    metrics = read_json(qlora / "train" / "metrics.json")
    assert metrics["method"] == "qlora" and metrics["device"] == "cpu" and metrics["steps"] == 4
    assert metrics["eval_loss"] < metrics["eval_loss_initial"], metrics  # the same held-out rows, before and after
    check = read_json(qlora / "merge" / "merge_check.json")
    assert check["passed"] and check["max_abs_logit_diff"] <= check["tolerance"]  # merged == 16-bit base + adapter
    assert check["max_abs_logit_diff_vs_4bit_base"] > 0  # what the adapter saw in training: the 4-bit base
    heldout = read_json(qlora / "eval" / "compare.json")["tasks"]["heldout"]
    assert {"base", "tuned"} <= set(heldout) and heldout["gguf"]["Q4_K_M"] is not None, heldout
    ref = heldout["metrics"]["ref_logprob"]  # per token, of the held-out reference code under each model
    assert ref["tuned"] > ref["base"], ref
    print(json.dumps({"train": {k: metrics[k] for k in ("train_loss_first", "train_loss_last", "eval_loss_initial",
                                                        "eval_loss", "seconds_per_step")},
                      "merge": check, "heldout": heldout}, indent=1))
