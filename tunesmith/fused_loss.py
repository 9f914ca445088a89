"""The loss kernel (train.args.fused_cross_entropy): on CUDA, Liger's fused linear + cross-entropy,
which computes the LM head and the loss chunk by chunk and never holds the logits, instead of
transformers' logits + cross-entropy, which materialises rows x length x vocabulary logits and
upcasts them to fp32 (batch 64 x 1024 x 49,152 in fp32 is 12.9 GB a copy; the H200 run of issue 24
allocated 101 GB at batch 64, most of it logits).

Only Liger's fused_linear_cross_entropy is switched on (liger_kernel_config), not its RMSNorm,
RoPE and SwiGLU kernels: those are what made `use_liger_kernel` 5-20% slower on an H100 for
135M-1B LoRA (bench/results/gpu-h100-2026-11-22.md). Not yet measured on its own on a GPU here:
bench/gpu_check.py --suite realistic has the rows (lora with and without it).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

from tunesmith.errors import TunesmithError

# trl's preference and RL trainers compute their own per-token log-probabilities from the logits;
# their Liger paths are separate losses with their own limits, so auto leaves them alone.
OBJECTIVES = ("sft", "causal-lm")
ONLY_FUSED_CE = {"fused_linear_cross_entropy": True, "cross_entropy": False, "rope": False, "rms_norm": False,
                 "swiglu": False}


@dataclass(frozen=True)
class LossChoice:
    kernel: str                    # "liger fused linear cross-entropy", "liger (all kernels)", "logits + cross-entropy", ...
    reason: str
    config: dict[str, Any] = field(default_factory=dict)  # TrainingArguments keys


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def logits_bytes(rows: int, length: int, vocab: int) -> int:
    """fp32 logits of one micro-batch (transformers upcasts them before the cross-entropy)."""
    return rows * length * vocab * 4


def choose(args: dict[str, Any], *, cuda: bool, objective: str, method: str, vocab: int | None = None) -> LossChoice:
    setting = args.get("fused_cross_entropy", "auto")
    size = ""
    if vocab:
        gb = logits_bytes(args["per_device_train_batch_size"], args["max_length"], vocab) / 1e9
        size = f" (fp32 logits of a full micro-batch: {args['per_device_train_batch_size']} x {args['max_length']} x {vocab} = {gb:.2f} GB)"
    if args["use_liger_kernel"]:
        # train.args.use_liger_kernel keeps its meaning: every Liger kernel, fused cross-entropy included.
        return LossChoice("liger (all kernels)", "train.args.use_liger_kernel is on", {"use_liger_kernel": True})
    plain = "logits + cross-entropy"
    if setting == "off":
        return LossChoice(plain, "train.args.fused_cross_entropy is off" + size)
    if method == "unsloth":
        return LossChoice("unsloth's own", "method unsloth patches the model with its own fused cross-entropy")
    if not cuda:
        if setting == "on":
            raise TunesmithError("train.args.fused_cross_entropy: on needs CUDA (Liger's kernels are Triton GPU "
                                 "kernels); use auto or off on this machine")
        return LossChoice(plain, "CPU: Liger's fused cross-entropy is a Triton GPU kernel" + size)
    if objective not in OBJECTIVES:
        if setting == "on":
            raise TunesmithError(f"train.args.fused_cross_entropy: on applies to objectives {', '.join(OBJECTIVES)}; "
                                 f"trl's {objective} trainer computes its own log-probabilities (use auto or off)")
        return LossChoice(plain, f"objective {objective}: trl's trainer computes its own log-probabilities" + size)
    if not liger_installed():
        if setting == "on":
            raise TunesmithError("train.args.fused_cross_entropy: on needs liger-kernel (pip install liger-kernel, "
                                 "in requirements-cuda.txt)")
        return LossChoice(plain, "liger-kernel is not installed" + size)
    return LossChoice("liger fused linear cross-entropy",
                      ("set by the recipe" if setting == "on" else "auto on CUDA") + ": the logits are never held" + size,
                      {"use_liger_kernel": True, "liger_kernel_config": dict(ONLY_FUSED_CE)})


def apply_now(model: Any, config: dict[str, Any]) -> None:
    """Patch the model with Liger at once (transformers 5.2x patches it only when train() starts; the
    micro-batch probe runs before that and must see the memory training will see)."""
    if not config.get("use_liger_kernel"):
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(model=base, **(config.get("liger_kernel_config") or {}))
