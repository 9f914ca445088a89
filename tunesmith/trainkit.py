"""Pieces shared by SFT (tunesmith.training) and pretraining (tunesmith.pretraining): device and
method checks, resumable checkpoints, the loss-history callback, memory figures and the loss plot."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tunesmith.errors import EnvironmentNotSupported, TunesmithError

log = logging.getLogger("tunesmith.train")

CHECKPOINT_PREFIX = "checkpoint-"
FINGERPRINT = "tunesmith_fingerprint.json"


# ---------------------------------------------------------------- device

def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def require_device(method: str) -> bool:
    """Return whether CUDA is here; stop at once when the method cannot run without it.

    Decided from torch, never from the scheduler's gpu resource (Snakemake scales that down silently)."""
    cuda = cuda_available()
    if method in ("qlora", "unsloth") and not cuda:
        why = ("bitsandbytes 4-bit loads on CPU but trains about 10x slower than LoRA there"
               if method == "qlora" else "unsloth cannot even be imported without a CUDA GPU")
        raise EnvironmentNotSupported(
            f"train.method '{method}' needs a CUDA GPU and torch sees none ({why}). "
            f"On this machine use 'method: lora' (same adapter, 16/32-bit base), "
            f"or run the train rule on a GPU node (--resources gpu=1 / the slurm profile).")
    return cuda


def world_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or "ACCELERATE_PROCESS_NUM" in os.environ


def relaunch_multi_gpu(script: str | Path, gpus: int, io: Any) -> None:
    """Run `script` again under `accelerate launch --num_processes gpus`, with this job's
    inputs, outputs and params passed by argv (the child cannot see Snakemake's object)."""
    import subprocess

    import torch

    have = torch.cuda.device_count()
    if have < gpus:
        raise EnvironmentNotSupported(f"train.gpus is {gpus} but torch sees {have} CUDA device(s) on this node")
    ckpt = Path(io.output["metrics"]).parent
    ckpt.mkdir(parents=True, exist_ok=True)
    params_file = ckpt / ".launch_params.json"
    params_file.write_text(json.dumps(io.params, default=str))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus),
           "--num_machines", "1", str(script), "--params", str(params_file)]
    for k, v in io.input.items():
        cmd += ["--input", f"{k}={v}"]
    for k, v in io.output.items():
        cmd += ["--output", f"{k}={v}"]
    log.info("multi-GPU: relaunching under accelerate with %d processes", gpus)
    # PYTHONSAFEPATH: the script's folder must not go on sys.path (scripts/select.py would shadow
    # the stdlib select module in every rank).
    env = dict(os.environ, PYTHONSAFEPATH="1")
    rc = subprocess.run(cmd, check=False, env=env).returncode
    if rc != 0:
        raise TunesmithError(f"accelerate launch with {gpus} processes failed (exit {rc}); see the log above")


# ---------------------------------------------------------------- checkpoints

def fingerprint(section: dict[str, Any], files: dict[str, str | Path]) -> str:
    """What a checkpoint was trained from: a resume with other params or data would mix two runs."""
    digest = hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode())
    for name in sorted(files):
        path = Path(files[name])
        if path.is_dir():
            for sub in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".jinja")):
                digest.update(f"{name}/{sub.name}".encode() + sub.read_bytes())
        elif path.is_file():
            digest.update(name.encode() + path.read_bytes())
    return digest.hexdigest()


def _complete(ckpt: Path) -> bool:
    # A kill -9 during a save leaves a folder without trainer_state.json (written last).
    return (ckpt / "trainer_state.json").is_file() and any(ckpt.glob("*.safetensors"))


def last_checkpoint(folder: str | Path) -> Path | None:
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for sub in folder.iterdir():
        if sub.is_dir() and sub.name.startswith(CHECKPOINT_PREFIX) and sub.name[len(CHECKPOINT_PREFIX):].isdigit():
            if _complete(sub):
                found.append((int(sub.name[len(CHECKPOINT_PREFIX):]), sub))
            else:
                log.warning("ignoring incomplete checkpoint %s (killed while saving?)", sub)
    return max(found)[1] if found else None


def prepare_checkpoints(folder: str | Path, fp: str) -> Path | None:
    """Return the checkpoint to resume from, discarding checkpoints of a different recipe/data."""
    folder = Path(folder)
    stamp = folder / FINGERPRINT
    if folder.is_dir() and stamp.is_file():
        old = json.loads(stamp.read_text()).get("fingerprint")
        if old != fp:
            log.warning("checkpoints in %s come from other params or data; starting from step 0", folder)
            shutil.rmtree(folder)
    elif folder.is_dir() and any(folder.glob(f"{CHECKPOINT_PREFIX}*")):
        log.warning("checkpoints in %s carry no fingerprint; starting from step 0", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"fingerprint": fp}))
    return last_checkpoint(folder)


def checkpoint_step(ckpt: Path) -> int:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return int(state.get("global_step", 0))


# ---------------------------------------------------------------- figures

def peak_memory_mb(cuda: bool) -> dict[str, float]:
    """Peak reserved CUDA memory (as the Unsloth notebooks report it) on GPU; peak RSS on CPU."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    out = {"peak_rss_mb": round(rss, 1)}
    if cuda:
        import torch

        out["peak_cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        out["peak_memory_mb"] = out["peak_cuda_reserved_mb"]
    else:
        out["peak_memory_mb"] = out["peak_rss_mb"]
    return out


def parameter_counts(model: Any) -> dict[str, float]:
    if hasattr(model, "get_nb_trainable_parameters"):  # peft: counts 4-bit packed weights right
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": int(trainable), "total_params": int(total),
            "trainable_share": float(trainable) / float(total) if total else 0.0}


def make_history_callback():
    """A TrainerCallback that keeps (step, loss) and (step, eval_loss) and logs one line per log."""
    from transformers import TrainerCallback

    class History(TrainerCallback):
        def __init__(self) -> None:
            self.train: list[tuple[int, float]] = []
            self.eval: list[tuple[int, float]] = []
            self.started = time.time()
            self.first_step: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.time()
            self.first_step = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                self.train.append((state.global_step, float(logs["loss"])))
                done = state.global_step - (self.first_step or 0)
                rate = (time.time() - self.started) / done if done else float("nan")
                log.info("step %d/%d loss %.4f lr %.3g (%.2f s/step)", state.global_step, state.max_steps,
                         logs["loss"], logs.get("learning_rate", float("nan")), rate)
            if "eval_loss" in logs:
                self.eval.append((state.global_step, float(logs["eval_loss"])))
                log.info("step %d eval_loss %.4f", state.global_step, logs["eval_loss"])

    return History()


def full_history(trainer: Any) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """Loss history from the trainer state (it survives a resume, unlike a fresh callback's)."""
    train, evals = [], []
    for entry in trainer.state.log_history:
        if "loss" in entry and "step" in entry:
            train.append((int(entry["step"]), float(entry["loss"])))
        if "eval_loss" in entry and "step" in entry:
            evals.append((int(entry["step"]), float(entry["eval_loss"])))
    return train, evals


def plot_loss(train: list[tuple[int, float]], evals: list[tuple[int, float]], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tunesmith.fileio import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], marker=".", label="train loss")
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], marker="o", linestyle="--", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no logged steps", ha="center", va="center", transform=ax.transAxes)
    save_figure(fig, path)
    plt.close(fig)


def log_training(record: Any, metrics: dict[str, Any], train: list[tuple[int, float]],
                 evals: list[tuple[int, float]], artifacts: list[str | Path]) -> None:
    """Loss curves as MLflow step metrics, the scalar figures beside them, and the files."""
    for step, value in train:
        record.log_metric("train_loss", value, step=step)
    for step, value in evals:
        record.log_metric("eval_loss", value, step=step)
    # train_loss / eval_loss are step histories in MLflow; the run average goes under its own key.
    record.log_metrics({k: v for k, v in metrics.items() if k not in ("eval_loss", "train_loss")})
    record.log_metric("train_loss_mean", metrics["train_loss"])
    for path in artifacts:
        record.log_artifact(path)
