"""What the trainer loop (tunesmith.trainer) records as it goes: the loss and objective histories,
steady throughput, memory and parameter figures, and their plots."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tunesmith.data.batches import peak_rss_mb
from tunesmith.fileio import pyplot, save_figure
from tunesmith.methods import cuda_available

log = logging.getLogger("tunesmith.train")


# ---------------------------------------------------------------- device


# ---------------------------------------------------------------- checkpoints


# ---------------------------------------------------------------- figures

def peak_memory_mb(cuda: bool) -> dict[str, float]:
    """Peak allocated CUDA memory on GPU (what the tensors needed; reserved, which includes the
    allocator's cache, beside it as the Unsloth notebooks report it); peak RSS on CPU."""
    out = {"peak_rss_mb": peak_rss_mb()}
    if cuda:
        import torch

        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["peak_cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        out["peak_memory_mb"] = out["peak_cuda_allocated_mb"]
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
    """A TrainerCallback that keeps (step, loss) and (step, eval_loss), logs one line per log, and
    times every optimizer step (for throughput without warm-up, evaluation or the final save)."""
    from transformers import TrainerCallback

    class History(TrainerCallback):
        def __init__(self) -> None:
            self.train: list[tuple[int, float]] = []
            self.eval: list[tuple[int, float]] = []
            self.steps: list[tuple[int, float, int]] = []  # (step, time at its end, tokens seen)
            self.started = time.time()
            self.first_step: int | None = None
            self.cuda = cuda_available()

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.time()
            self.first_step = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            if self.cuda:  # kernels run ahead of the host: time what finished
                import torch

                torch.cuda.synchronize()
            self.steps.append((state.global_step, time.time(), int(getattr(state, "num_input_tokens_seen", 0) or 0)))

        def steady_rate(self, warmup: int = 3) -> dict[str, float | None]:
            """Tokens/s and s/step over the steps after the first `warmup` (compilation, allocator
            growth, first batches), ending at the last step's end: evaluation and saves in between
            count, the final save does not."""
            steps = self.steps[min(warmup, max(0, len(self.steps) - 2)):]
            if len(steps) < 2 or steps[-1][1] <= steps[0][1]:
                return {"steady_tokens_per_second": None, "steady_seconds_per_step": None}
            seconds = steps[-1][1] - steps[0][1]
            return {"steady_tokens_per_second": (steps[-1][2] - steps[0][2]) / seconds,
                    "steady_seconds_per_step": seconds / (steps[-1][0] - steps[0][0])}

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


def first_eval_callback(keep: Any):
    """A TrainerCallback that keeps the first evaluation's metrics (eval_on_start's, before step one
    of this run) and hands them to `keep` at once, so that a crash after it does not lose them."""
    from transformers import TrainerCallback

    class FirstEval(TrainerCallback):
        metrics: dict[str, Any] | None = None

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if self.metrics is None and metrics is not None:
                self.metrics = dict(metrics)
                log.info("eval loss before training: %.4f", self.metrics["eval_loss"])
                keep(self.metrics)

    return FirstEval()


def full_history(trainer: Any) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """Loss history from the trainer state (it survives a resume, unlike a fresh callback's)."""
    train, evals = [], []
    for entry in trainer.state.log_history:
        if "loss" in entry and "step" in entry:
            train.append((int(entry["step"]), float(entry["loss"])))
        if "eval_loss" in entry and "step" in entry:
            evals.append((int(entry["step"]), float(entry["eval_loss"])))
    return train, evals


def objective_histories(log_history: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) curves of the train-time figures an objective logs beside the loss, in the order
    of `names`; a name ending in '/' takes every logged key under it (GRPO's rewards/<function>/mean)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for name in names:
        for entry in log_history:
            if "step" not in entry or "loss" not in entry:  # train logs only; eval logs carry eval_ keys
                continue
            keys = sorted(k for k in entry if k.startswith(name)) if name.endswith("/") else [name] if name in entry else []
            for key in keys:
                value = entry[key]
                if isinstance(value, (int, float)) and value == value:  # NaN: a batch without that kind of row
                    curves.setdefault(key, []).append((int(entry["step"]), float(value)))
    return curves


def plot_histories(curves: dict[str, list[tuple[int, float]]], path: str | Path, title: str) -> None:
    """One small panel per curve (rewards/chosen, rewards/margins, reward, ...), sharing the step axis."""

    plt = pyplot()
    names = list(curves) or ["(none)"]
    cols = 2 if len(names) > 1 else 1
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 2.6 * rows), squeeze=False, sharex=True)
    for ax, name in zip(axes.flat, names):
        points = curves.get(name, [])
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], marker=".")
        else:
            ax.text(0.5, 0.5, "no logged steps", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_loss(train: list[tuple[int, float]], evals: list[tuple[int, float]], path: str | Path, title: str) -> None:

    plt = pyplot()

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
