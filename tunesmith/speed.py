"""The speed choices of one training run, made before step one and recorded in metrics.json:
the attention kernel (chosen at load, tunesmith.attention), the loss kernel (tunesmith.fused_loss),
length-grouped sampling, torch.compile, one packed-row length for flex attention, the micro-batch
(tunesmith.batching), and the padding share of the batches the run built.

The trainer loop calls plan() before it builds its trainer and prepare() after, so each choice is
made once, here, and the loop stays one loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from tunesmith import attention, batching, fused_loss

log = logging.getLogger("tunesmith.train")


@dataclass
class Plan:
    args: dict[str, Any]
    cuda: bool
    packing: bool
    attention: attention.Choice | None
    loss: fused_loss.LossChoice
    config: dict[str, Any]                       # TrainingArguments keys over the recipe's
    objective: str
    metrics: dict[str, Any] = field(default_factory=dict)
    padding: batching.PaddingCount | None = None


def vocab_size(model: Any) -> int | None:
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except Exception:  # noqa: BLE001 - a model without the accessor: the figure is only for the reason text
        return getattr(getattr(model, "config", None), "vocab_size", None)


def plan(args: dict[str, Any], model: Any, *, cuda: bool, objective: str, method: str, config_cls: Any) -> Plan:
    packing = bool(args.get("packing")) and objective == "sft"
    choice = getattr(model, "_tunesmith_attention", None)
    loss = fused_loss.choose(args, cuda=cuda, objective=objective, method=method, vocab=vocab_size(model))
    config = dict(loss.config)
    # sft rows vary in length; causal-lm blocks do not, and trl's preference/RL trainers keep
    # their own samplers and columns (no input_ids for LengthGroupedSampler to measure).
    group = bool(args["group_by_length"]) and not packing and objective == "sft"
    config.update(batching.sampler_kwargs(config_cls, group))
    if args["torch_compile"]:
        config["torch_compile"] = True
    p = Plan(args, cuda, packing, choice, loss, config, objective)
    _row_length(p, int(args["per_device_train_batch_size"]))
    impl = choice.implementation if choice else getattr(getattr(model, "config", None), "_attn_implementation", None)
    p.metrics.update({"attn_implementation": impl,
                      "attn_reason": choice.reason if choice else "chosen by the method's own loader",
                      "loss_kernel": loss.kernel, "loss_kernel_reason": loss.reason,
                      "group_by_length": group,
                      "torch_compile": bool(args["torch_compile"])})
    log.info("attention %s (%s); loss %s (%s)", impl, p.metrics["attn_reason"], loss.kernel, loss.reason)
    return p


def _row_length(p: Plan, micro: int) -> None:
    """flex attention compiles per shape: pad every packed micro-batch to micro x max_length tokens
    (trl's collator pads position ids with 0, so the padding is documents of its own, unlabelled)."""
    if p.packing and p.attention is not None and p.attention.static_row:
        p.config["pad_to_multiple_of"] = micro * int(p.args["max_length"])


def prepare(p: Plan, trainer: Any, build: Callable[[dict[str, Any]], Any]) -> Any:
    """After the trainer is built: refuse leaky packing, find the micro-batch (rebuilding the
    trainer with it), and count the padding of every batch from here on. Returns the trainer."""
    if p.packing:
        p.metrics["packing_isolation_max_diff"] = attention.check_isolation(trainer.model, trainer.data_collator)
    args = p.args
    micro, accum = int(args["per_device_train_batch_size"]), int(args["gradient_accumulation_steps"])
    if args["auto_batch"]:
        device = next(q.device for q in trainer.model.parameters()).type
        if not p.cuda or device != "cuda":
            p.metrics["auto_batch"] = f"not probed: the model is on {device} (out-of-memory is a CUDA notion here)"
        else:
            fused_loss.apply_now(trainer.model, p.loss.config)
            optim = trainer.args.optim.value if hasattr(trainer.args.optim, "value") else str(trainer.args.optim)
            search = batching.find_micro_batch(
                batching.probe(trainer, batching.optimizer_state_bytes(trainer.model, optim)), micro * accum,
                start=micro)
            p.metrics["auto_batch"] = {"tried": [{"micro_batch": n, "fits": ok} for n, ok in search.tried]}
            if search.micro_batch != micro:
                log.info("auto_batch: micro-batch %d x %d accumulation steps (the recipe's %d x %d)",
                         search.micro_batch, search.gradient_accumulation_steps, micro, accum)
                micro, accum = search.micro_batch, search.gradient_accumulation_steps
                p.config.update(per_device_train_batch_size=micro, gradient_accumulation_steps=accum)
                _row_length(p, micro)
                trainer = build(p.config)
    p.metrics.update({"micro_batch": micro, "gradient_accumulation_steps": accum,
                      "effective_batch_per_device": micro * accum})
    if p.objective in ("sft", "causal-lm"):  # rows of input_ids; trl's preference/RL trainers batch other columns
        p.padding = batching.PaddingCount(trainer.data_collator)
        trainer.data_collator = p.padding
    return trainer


def figures(p: Plan) -> dict[str, Any]:
    out = dict(p.metrics)
    if p.padding is not None:
        out.update(p.padding.figures())
    return out
