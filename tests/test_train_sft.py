"""Training, merge and resume through the real entry scripts (the way Snakemake runs them)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

FAKE_TOKEN = "hf_tunesmithFAKEtoken0123456789abcdefXYZ"


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "TUNESMITH_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "TUNESMITH_TRACKING": "1",
        "TUNESMITH_RESULTS": str(tmp_path / "results"), "TUNESMITH_INVOCATION": "test-invocation",
        "HF_TOKEN": FAKE_TOKEN, "MPLBACKEND": "Agg",
    })
    return env


def _stage(script: str, tmp_path: Path, inputs: dict, outputs: dict, params: dict, log: Path, **popen):
    pfile = tmp_path / f"{script}.params.json"
    pfile.write_text(json.dumps(params))
    # -P keeps scripts/ off sys.path, as Snakemake's script runner does.
    cmd = [sys.executable, "-P", str(REPO / "scripts" / "stage.py"), script, "--params", str(pfile), "--log", str(log),
           "--recipe", "t", "--variant", "main"]
    cmd += [f"--input={k}={v}" for k, v in inputs.items()] + [f"--output={k}={v}" for k, v in outputs.items()]
    return subprocess.Popen(cmd, cwd=tmp_path, env=_env(tmp_path), start_new_session=True, **popen)


def _outputs(run_dir: Path) -> dict[str, str]:
    return {"model": str(run_dir / "model/trained"), "metrics": str(run_dir / "train/metrics.json"),
            "loss": str(run_dir / "train/loss.png")}


@pytest.mark.slow
def test_lora_trains_merges_and_keeps_the_token_secret(tmp_path, tiny_llama_dir, sft_data, section_factory):
    """On a tiny random Llama: the default workflow's test is the one real SmolLM2 run."""
    section = section_factory("lora", max_steps=8, learning_rate=2e-3, save_steps=4)
    section["train"]["sample_eval_rows"] = 4
    run_dir = tmp_path / "results/t/main"
    params = {"section": section}
    log = tmp_path / "logs/train.log"
    proc = _stage("train", tmp_path, {**sft_data, "base": str(tiny_llama_dir)}, _outputs(run_dir), params, log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]

    metrics = json.loads((run_dir / "train/metrics.json").read_text())
    for key in ("train_loss", "train_loss_first", "train_loss_last", "eval_loss", "eval_loss_initial",
                "tokens_per_second", "peak_memory_mb", "peak_rss_mb", "trainable_share", "trainable_params",
                "wall_seconds", "train_seconds", "seconds_per_step", "steps", "method", "device", "loss_history"):
        assert metrics.get(key) is not None, key
    assert metrics["steps"] == 8 and metrics["method"] == "lora" and metrics["device"] == "cpu"
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert metrics["eval_loss"] < metrics["eval_loss_initial"]
    assert 0 < metrics["trainable_share"] < 0.05
    assert (run_dir / "train/loss.png").read_bytes()[:4] == b"\x89PNG"
    trained = run_dir / "model/trained"
    assert (trained / "adapter_model.safetensors").is_file()
    assert json.loads((trained / "tunesmith_train.json").read_text())["method"] == "lora"
    assert not list(trained.glob("*.bin")) and not list(trained.glob("*.pt"))
    assert "contract gate passed" in log.read_text()

    merge_out = {"merged": str(run_dir / "model/merged"), "samples": str(run_dir / "merge/samples.txt"),
                 "check": str(run_dir / "merge/merge_check.json")}
    merge_in = {"model": str(trained), "metrics": str(run_dir / "train/metrics.json"), "base": str(tiny_llama_dir),
                "template": sft_data["template"], "eval": sft_data["eval"]}
    mlog = tmp_path / "logs/merge.log"
    proc = _stage("merge", tmp_path, merge_in, merge_out, {**params, "card": {"description": "test"}}, mlog)
    assert proc.wait(timeout=900) == 0, mlog.read_text()[-3000:]
    check = json.loads((run_dir / "merge/merge_check.json").read_text())
    assert check["passed"] and check["max_abs_logit_diff"] < 1e-3
    assert check["adapter_effect_max_abs_logit_diff"] > 1e-2  # the adapter changed something
    samples = (run_dir / "merge/samples.txt").read_text()
    assert "prompt: Reverse the order of these words: lamp, ocean, tiger" in samples
    merged = run_dir / "model/merged"
    assert (merged / "chat_template.jinja").read_text() == Path(sft_data["template"]).read_text()
    assert "base_model:" in (merged / "README.md").read_text()

    # The merged folder reloads alone and generates, stopping at EOS.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert str(model.dtype) == "torch.bfloat16"
    ids = tok.apply_chat_template([{"role": "user", "content": "Reverse: a, b"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]

    # MLflow: train and merge child runs, the loss curve as step metrics.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("t")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert {"train[main]", "merge[main]"} <= set(runs)
    history = client.get_metric_history(runs["train[main]"].info.run_id, "train_loss")
    assert len(history) >= 8 and history[0].step == 1
    assert runs["merge[main]"].data.metrics["max_abs_logit_diff"] < 1e-3

    # The hub token is in the environment of both stages and must appear nowhere.
    needle = FAKE_TOKEN.encode()
    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert not leaks, f"HF_TOKEN leaked into {leaks}"
    con = sqlite3.connect(tmp_path / "mlflow.db")
    for table in ("params", "tags", "metrics", "runs"):
        rows = con.execute(f"select * from {table}").fetchall()
        assert FAKE_TOKEN not in repr(rows), table


@pytest.mark.slow
def test_kill_9_mid_training_then_rerun_resumes(tmp_path, tiny_llama_dir, sft_data, section_factory):
    section = section_factory("lora", max_steps=10, save_steps=2, logging_steps=1)
    run_dir = tmp_path / "results/t/main"
    params = {"section": section}
    inputs = {**sft_data, "base": str(tiny_llama_dir)}
    ckpts = run_dir / "train/checkpoints"
    log1 = tmp_path / "logs/train1.log"
    proc = _stage("train", tmp_path, inputs, _outputs(run_dir), params, log1)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in ckpts.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
        if done:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "training finished before it could be killed:\n" + log1.read_text()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "train/metrics.json").exists()
    assert not (run_dir / "model/trained").exists()

    log2 = tmp_path / "logs/train2.log"
    proc = _stage("train", tmp_path, inputs, _outputs(run_dir), params, log2)
    assert proc.wait(timeout=600) == 0, log2.read_text()[-3000:]
    text = log2.read_text()
    assert "resuming from checkpoint" in text, text[-2000:]
    metrics = json.loads((run_dir / "train/metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 2
    assert metrics["steps"] == 10
    assert metrics["steps_this_run"] == 10 - metrics["resumed_from_step"]
    # The loss history still starts at step 1: it comes from the checkpoint's trainer state.
    assert metrics["loss_history"][0]["step"] == 1

    # Changing a training setting invalidates the checkpoints instead of mixing two runs.
    section["train"]["args"]["learning_rate"] = 5e-4
    params["section"] = section
    log3 = tmp_path / "logs/train3.log"
    proc = _stage("train", tmp_path, inputs, _outputs(run_dir), params, log3)
    assert proc.wait(timeout=600) == 0, log3.read_text()[-3000:]
    assert "come from other optimisation params or data" in log3.read_text()
    assert json.loads((run_dir / "train/metrics.json").read_text())["resumed_from_step"] == 0
    assert any((run_dir / "train/checkpoints.stale-1").glob("checkpoint-*"))  # set aside, not deleted


@pytest.mark.slow
def test_full_finetune_and_packing_on_tiny_model(tmp_path, tiny_llama_dir, sft_data, section_factory):
    from tunesmith.merging import merge
    from tunesmith.training import TrainPaths, train

    section = section_factory("full", max_steps=3, packing=True, save_steps=10)
    section["train"]["sample_eval_rows"] = 2
    run = tmp_path / "r"
    paths = TrainPaths(base=str(tiny_llama_dir), model=str(run / "model/trained"), metrics=str(run / "train/metrics.json"),
                     loss=str(run / "train/loss.png"), **sft_data)
    metrics = train(paths, section).metrics
    assert metrics["method"] == "full" and metrics["packing"] and metrics["trainable_share"] == 1.0
    assert (run / "model/trained/model.safetensors").is_file()
    merge(trained=paths.model, base=paths.base, template=paths.template, merged=str(run / "model/merged"),
          samples_path=str(run / "merge/samples.txt"), check_path=str(run / "merge/check.json"),
          section=section, eval_path=paths.eval, recipe="t")
    check = json.loads((run / "merge/check.json").read_text())
    assert check["passed"] and check["method"] == "full"
    assert (run / "model/merged/model.safetensors").is_file()


@pytest.mark.slow
def test_qlora_trains_and_merges_on_cpu(tmp_path, llama256_dir, sft_data, section_factory):
    """bitsandbytes 0.50 on CPU: nf4 + double quantisation, paged 8-bit AdamW, LoRA on every linear
    layer; merged into the 16-bit base, with both merge differences reported."""
    from tunesmith.merging import merge
    from tunesmith.training import TrainPaths, train

    section = section_factory("qlora", max_steps=4, save_steps=10)
    section["train"]["sample_eval_rows"] = 2
    assert section["train"]["quantization"] == {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    run = tmp_path / "r"
    paths = TrainPaths(base=str(llama256_dir), model=str(run / "model/trained"), metrics=str(run / "train/metrics.json"),
                     loss=str(run / "train/loss.png"), **sft_data)
    metrics = train(paths, section).metrics
    assert metrics["method"] == "qlora" and metrics["device"] == "cpu"
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    merge(trained=paths.model, base=paths.base, template=paths.template, merged=str(run / "model/merged"),
          samples_path=str(run / "merge/samples.txt"), check_path=str(run / "merge/check.json"),
          section=section, eval_path=paths.eval, recipe="q")
    check = json.loads((run / "merge/check.json").read_text())
    assert check["passed"] and check["max_abs_logit_diff"] < 1e-3  # merged == 16-bit base + adapter
    assert 0 < check["max_abs_logit_diff_vs_4bit_base"]  # the 4-bit rounding the adapter was trained with


def test_4bit_layers_compute_in_fp32_on_a_cpu_without_native_half_precision():
    # bf16 compute on this CPU (no AVX512-BF16/AMX): 258 s a step for SmolLM2-135M QLoRA; fp32: 55 s.
    import torch

    from tunesmith.methods import compute_dtype_4bit

    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert compute_dtype_4bit("bfloat16", cuda=False) == (torch.bfloat16 if native else torch.float32)
    assert compute_dtype_4bit("float16", cuda=False) == torch.float32
    assert compute_dtype_4bit("float16", cuda=True) == torch.float16  # GPUs keep what the recipe says
    assert compute_dtype_4bit("float32", cuda=False) == torch.float32


def test_merge_job_memory_is_sized_from_the_base_model(tmp_path, tiny_llama_dir):
    # A fixed 8 GB used to be asked for whatever the model; a 7B merge holds ~60 GB in fp32.
    from safetensors import safe_open

    from tunesmith.models import MERGE_MEM_FALLBACK_MB, merge_mem_mb, parameter_count

    with safe_open(str(tiny_llama_dir / "model.safetensors"), "pt") as fh:
        expected = sum(_prod(fh.get_slice(name).get_shape()) for name in fh.keys())
    assert parameter_count(tiny_llama_dir) == expected > 0
    assert merge_mem_mb(tmp_path / "not-prepared-yet") == MERGE_MEM_FALLBACK_MB
    seven_b = tmp_path / "7b"
    seven_b.mkdir()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [7_000_000_000], "data_offsets": [0, 0]}}).encode()
    (seven_b / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert 55_000 < merge_mem_mb(seven_b) < 65_000


def _prod(shape):
    out = 1
    for dim in shape:
        out *= dim
    return out


def test_token_metrics_off_trains_on_the_same_loss(tmp_path, tiny_llama_dir, sft_data, section_factory):
    """train.args.token_metrics: false (transformers' logits + cross-entropy) and true (trl's fused LM
    head, which also logs entropy and token accuracy) give the same loss curve and eval loss."""
    from tunesmith import training

    runs = {}
    for flag in (False, True):
        section = section_factory("lora", max_steps=3, save_steps=3, token_metrics=flag)
        out = tmp_path / str(flag)
        result = training.train(training.TrainPaths(base=str(tiny_llama_dir), **sft_data, **_outputs(out)), section)
        runs[flag] = (result.histories["train_loss"], result.metrics["eval_loss_final"], result.metrics["eval_loss_initial"])
    (plain, plain_eval, plain_initial), (fused, fused_eval, fused_initial) = runs[False], runs[True]
    assert [s for s, _ in plain] == [s for s, _ in fused] == [1, 2, 3]
    assert max(abs(a - b) for (_, a), (_, b) in zip(plain, fused)) < 1e-4
    assert abs(plain_eval - fused_eval) < 1e-4 and abs(plain_initial - fused_initial) < 1e-5
