"""The one trainer loop, shared by every objective (SFT, causal-LM pretraining, ...): one mapping
of the recipe's training arguments to Hugging Face's, checkpoints validated and resumed, the
eval loss before and after, the loss history, metrics.json, the loss plot, an atomic model folder.

An objective (tunesmith.objectives) brings its datasets, its trainer class and the few
arguments only it has; a method (tunesmith.methods) brings the model.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunesmith import checkpoints, histories, ranks, speed
from tunesmith.errors import TunesmithError
from tunesmith.fileio import replace_dir, write_json
from tunesmith.result import Result

log = logging.getLogger("tunesmith.train")

EIGHT_BIT_OPTIMS = ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit")


def precision(args: dict[str, Any], cuda: bool) -> tuple[bool, bool]:
    """(bf16, fp16) mixed precision: GPU only; bf16 by default where the GPU has it natively."""
    if not cuda:
        if args["bf16"] or args["fp16"]:
            log.warning("bf16/fp16 mixed precision is GPU-only; training in fp32 on CPU")
        return False, False
    import torch

    fp16 = bool(args["fp16"])
    bf16 = args["bf16"]
    if bf16 is None:
        bf16 = bool(torch.cuda.is_bf16_supported(including_emulation=False)) and not fp16
    return bool(bf16), fp16


def training_arguments(config_cls: Any, args: dict[str, Any], *, optim: str, gradient_checkpointing: bool,
                       output_dir: Path, cuda: bool, has_eval: bool, overrides: dict[str, Any] | None = None,
                       **objective_args: Any) -> Any:
    """The recipe's train.args (resolved: every key present) -> the objective's TrainingArguments.
    overrides: what the run's speed choices set (tunesmith.speed.Plan.config: loss kernel, sampler,
    compile, micro-batch), over the recipe's values."""
    if optim in EIGHT_BIT_OPTIMS:
        try:
            import bitsandbytes  # noqa: F401  (its 8-bit optimisers step on CPU as well since 0.45)
        except ImportError:
            raise TunesmithError(f"train.args.optim '{optim}' needs bitsandbytes, which is not installed; "
                                 f"pip install bitsandbytes, or use adamw_torch") from None
    bf16, fp16 = precision(args, cuda)
    if args["use_liger_kernel"] and not cuda:
        raise TunesmithError("train.args.use_liger_kernel needs CUDA (Liger's kernels are Triton GPU kernels); "
                             "set it to false on this machine")
    eval_steps = args["eval_steps"] if has_eval else None
    kwargs = dict(
        output_dir=str(output_dir),
        learning_rate=args["learning_rate"],
        num_train_epochs=args["num_train_epochs"],
        max_steps=args["max_steps"],
        per_device_train_batch_size=args["per_device_train_batch_size"],
        per_device_eval_batch_size=args["per_device_eval_batch_size"],
        gradient_accumulation_steps=args["gradient_accumulation_steps"],
        warmup_steps=args["warmup_steps"],
        lr_scheduler_type=args["lr_scheduler_type"],
        optim=optim,
        weight_decay=args["weight_decay"],
        max_grad_norm=args["max_grad_norm"],
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        logging_steps=args["logging_steps"],
        logging_first_step=True,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=args["save_steps"],
        save_total_limit=args["save_total_limit"],
        seed=args["seed"],
        data_seed=args["seed"],
        bf16=bf16,
        fp16=fp16,
        use_cpu=not cuda,
        report_to="none",  # the runner records the Result; trainer integrations would log env and args
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_liger_kernel=bool(args["use_liger_kernel"]),
        **objective_args,
    )
    kwargs.update(overrides or {})
    return config_cls(**kwargs)


@dataclass
class Fit:
    """What a training run needs beyond the model: set by the objective's stage function."""

    objective: Any                  # a tunesmith.objectives module
    model: Any
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any | None
    args: dict[str, Any]            # resolved train.args
    method: Any                     # a tunesmith.methods.Method
    cuda: bool
    checkpoints: Path
    fingerprint: str
    model_out: Path
    metrics_path: Path
    loss_path: Path
    title: str
    save: Callable[[Any, Path], None]          # (trainer, tmp folder) -> writes the model folder
    before_train: Callable[[Any], None] | None = None  # (trainer) -> e.g. the contract gate
    extra_metrics: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)        # the objective's own section (train.dpo, ...)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. GRPO's reward functions, DPO's ref_model
    histories_path: Path | None = None  # plot of the objective's step histories (rewards, margins, ...)


def fit(job: Fit) -> Result:
    """Train (resuming from the newest good checkpoint), then write model, metrics and plot."""
    import torch

    started = time.time()
    rank0 = ranks.world_rank() == 0
    gc = bool(job.args["gradient_checkpointing"]) and not job.method.own_gradient_checkpointing
    config_cls = job.objective.config_class()
    plan = speed.plan(job.args, job.model, cuda=job.cuda, objective=job.objective.NAME, method=job.method.name,
                      config_cls=config_cls)
    history = histories.make_history_callback()

    def build(overrides: dict[str, Any]) -> Any:
        config = training_arguments(config_cls, job.args, optim=job.args["optim"] or job.method.default_optim,
                                    gradient_checkpointing=gc, output_dir=job.checkpoints, cuda=job.cuda,
                                    has_eval=job.eval_dataset is not None, overrides=overrides,
                                    **job.objective.config_kwargs(job.args, job.settings))
        return job.objective.build_trainer(job.model, job.tokenizer, config, job.train_dataset, job.eval_dataset,
                                           [history], **job.trainer_kwargs)

    trainer = build(plan.config)
    if job.before_train is not None:
        job.before_train(trainer)
    trainer = speed.prepare(plan, trainer, build)  # leaky packing refused; the micro-batch found; padding counted
    # Rank 0 discards stale checkpoints and sets corrupt ones aside; the others then take the
    # newest one left, so every rank resumes from the same step.
    resume = checkpoints.prepare_checkpoints(job.checkpoints, job.fingerprint) if rank0 else None
    trainer.accelerator.wait_for_everyone()
    if not rank0:
        resume = checkpoints.last_checkpoint(job.checkpoints, validate=False)

    initial_file = job.checkpoints / "initial_eval.json"
    initial_eval = None
    initial_figures: dict[str, float] = {}
    first_eval = None
    if job.eval_dataset is not None:
        if resume is None or not initial_file.is_file():
            # The eval before training runs inside train() (eval_on_start), after the model is wrapped:
            # a trainer.evaluate() first marks the model prepared, and train() then never wraps it in
            # DistributedDataParallel, so the ranks' gradients are never averaged (transformers 5.23,
            # accelerate 1.15; tests/test_train_ddp.py).
            trainer.args.eval_on_start = True
            first_eval = histories.first_eval_callback(
                lambda first: write_json(initial_file, {"eval_loss": float(first["eval_loss"]),
                                                         **_eval_figures(first, job.objective)})
                if rank0 else None)
            trainer.add_callback(first_eval)
        else:
            saved = json.loads(initial_file.read_text())
            initial_eval = float(saved.pop("eval_loss"))
            initial_figures = saved
            log.info("eval loss before training: %.4f", initial_eval)

    resumed_from = checkpoints.checkpoint_step(resume) if resume is not None else 0
    if resume is not None:
        log.info("resuming from checkpoint %s (global_step %d)", resume, resumed_from)
    else:
        log.info("no checkpoint in %s: training from step 0", job.checkpoints)
    if job.cuda:
        torch.cuda.reset_peak_memory_stats()
    tokens_before = checkpoints.tokens_seen(resume) if resume is not None else 0
    train_started = time.time()
    # first_eval set: the eval before training runs inside train(), so a finished checkpoint whose
    # initial_eval.json was lost still goes through transformers' resume.
    if resume is not None and first_eval is None and 0 < trainer.args.max_steps <= resumed_from:
        result = _finished_checkpoint(trainer, resume)
    else:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_seconds = time.time() - train_started
    speed_figures = speed.figures(plan)  # before the final evaluate() adds its batches
    if first_eval is not None:
        initial_eval = float(first_eval.metrics["eval_loss"])
        initial_figures = _eval_figures(first_eval.metrics, job.objective)
        train_seconds -= float(first_eval.metrics.get("eval_runtime", 0.0))  # training time, as before
    last = trainer.evaluate() if job.eval_dataset is not None else None
    final_eval = float(last["eval_loss"]) if last is not None else None
    final_figures = _eval_figures(last, job.objective) if last is not None else {}

    step = int(trainer.state.global_step)
    steps_run = step - resumed_from
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0) - tokens_before
    train_hist, eval_hist = histories.full_history(trainer)
    # What the objective logs beside the loss (DPO's rewards/margins, GRPO's reward mean): from the
    # trainer state, like the loss, so a resumed run keeps the steps before the crash.
    curves = histories.objective_histories(trainer.state.log_history, getattr(job.objective, "HISTORIES", ()))
    if final_eval is not None:
        eval_hist = [e for e in eval_hist if e[0] != step] + [(step, final_eval)]
    if initial_eval is not None:
        eval_hist = [(0, initial_eval)] + [e for e in eval_hist if e[0] != 0]
    counts = histories.parameter_counts(job.model)
    metrics: dict[str, Any] = {
        "method": job.method.name,
        "objective": job.objective.NAME,
        "device": "cuda" if job.cuda else "cpu",
        "device_name": torch.cuda.get_device_name(0) if job.cuda else "cpu",
        "world_size": ranks.world_size(),
        "train_rows": len(job.train_dataset),
        "eval_rows": len(job.eval_dataset) if job.eval_dataset is not None else 0,
        "train_loss": float(result.training_loss),  # the run's mean; MLflow's train_loss is the curve
        "train_loss_first": train_hist[0][1] if train_hist else None,
        "train_loss_last": train_hist[-1][1] if train_hist else None,
        "eval_loss_initial": initial_eval,
        "eval_loss": final_eval,
        # exp(loss) is a perplexity only where the loss is the token NLL (not DPO's, KTO's or GRPO's)
        "eval_perplexity": float(torch.exp(torch.tensor(final_eval)))
        if final_eval is not None and getattr(job.objective, "LOSS_IS_NLL", True) else None,
        "steps": step,
        "steps_this_run": int(steps_run),
        "resumed_from_step": int(resumed_from),
        "epochs": float(trainer.state.epoch or 0.0),
        "tokens_this_run": tokens,
        "tokens_per_second": tokens / train_seconds if train_seconds > 0 else 0.0,
        "seconds_per_step": train_seconds / steps_run if steps_run else None,
        **history.steady_rate(),
        "train_seconds": train_seconds,
        **counts,
        **histories.peak_memory_mb(job.cuda),
        **job.extra_metrics,
        **speed_figures,
        "loss_history": [{"step": s, "loss": v} for s, v in train_hist],
        "eval_history": [{"step": s, "eval_loss": v} for s, v in eval_hist],
    }
    for name, points in curves.items():
        metrics[f"{name}_first"], metrics[f"{name}_last"] = points[0][1], points[-1][1]
    # The objective's figures on the held-out rows before and after (DPO's eval reward accuracy).
    metrics.update({f"{k}_initial": v for k, v in initial_figures.items()})
    metrics.update(final_figures)
    if curves:
        metrics["histories"] = {name: [{"step": s, "value": v} for s, v in points] for name, points in curves.items()}

    tmp = job.model_out.with_name(f".{job.model_out.name}.tmp")
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    job.save(trainer, tmp)  # every rank calls it (sharded setups gather); only rank 0 writes
    if not trainer.is_world_process_zero():
        return Result(metrics=metrics)

    replace_dir(tmp, job.model_out)
    metrics["wall_seconds"] = time.time() - started
    histories.plot_loss(train_hist, eval_hist, job.loss_path, f"{job.title}: {step} steps")
    artifacts = [str(job.metrics_path), str(job.loss_path)]
    if job.histories_path is not None:
        histories.plot_histories(curves, job.histories_path, f"{job.objective.NAME}, {job.title}: {step} steps")
        artifacts.append(str(job.histories_path))
    write_json(job.metrics_path, metrics)
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    scalars["train_loss_mean"], scalars["eval_loss_final"] = scalars.pop("train_loss"), scalars.pop("eval_loss")
    return Result(metrics=scalars, histories={"train_loss": train_hist, "eval_loss": eval_hist, **curves},
                  artifacts=artifacts,
                  tags={"tunesmith.train.method": job.method.name, "tunesmith.train.objective": job.objective.NAME,
                        "tunesmith.train.device": metrics["device"]},
                  summary=f"{job.objective.NAME}/{job.method.name} on {metrics['device']}: loss "
                          f"{_fmt(metrics['train_loss_first'])} -> {_fmt(metrics['train_loss_last'])}, eval "
                          f"{_fmt(initial_eval)} -> {_fmt(final_eval)}, {step} steps, {train_seconds:.0f} s"
                          + "".join(f", {name} {_fmt(curves[name][-1][1])}"
                                    for name in getattr(job.objective, "HEADLINE", ()) if name in curves))


def _finished_checkpoint(trainer: Any, resume: Path) -> Any:
    """The checkpoint of the last step (a rerun of a finished run, e.g. after an upstream file was
    rewritten unchanged): its weights and state, with no training. trainer.train() would resume it
    and take one step past max_steps before it checks (transformers 5.x), at the schedule's
    last learning rate: 0 for linear, not for cosine or constant."""
    from types import SimpleNamespace

    from transformers.trainer_callback import TrainerState

    trainer._load_from_checkpoint(str(resume))
    trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
    losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
    log.info("checkpoint %s is at max_steps (%d): its weights, no step trained", resume, trainer.state.global_step)
    return SimpleNamespace(training_loss=sum(losses) / len(losses) if losses else float("nan"))


def _eval_figures(out: dict[str, Any], objective: Any) -> dict[str, float]:
    """eval_<name> for each step figure the objective names (not the prefixes), from evaluate()."""
    names = [n for n in getattr(objective, "HISTORIES", ()) if not n.endswith("/")]
    return {f"eval_{n}": float(out[f"eval_{n}"]) for n in names if isinstance(out.get(f"eval_{n}"), (int, float))}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
