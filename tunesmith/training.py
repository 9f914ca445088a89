"""The train stage's loop around an objective: a base model, adapted by a method
(tunesmith.methods), trained for an objective (tunesmith.objectives) through the one loop
(tunesmith.trainer).

train() is the same for every objective: set up (method, device, seed, tokenizer), let the
objective read its rows and build its datasets, gate and extra trainer arguments (its
`prepare`), load the model, fit. What differs between sft, dpo, kto and grpo lives in the
objective's module.

Checkpoints go next to the metrics file (not a declared output, so they survive a crash) and a
rerun resumes from the newest complete one.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith import checkpoints, contract, histories, methods, objectives
from tunesmith import trainer as trainer_loop
from tunesmith.data.tokens import switch_off_padding
from tunesmith.errors import TunesmithError
from tunesmith.result import Result

log = logging.getLogger("tunesmith.train")

TRAIN_INFO = "tunesmith_train.json"


@dataclass
class TrainPaths:
    """The files of a train job. train/eval: what the objective reads (objectives.<name>.INPUTS)."""

    train: str
    eval: str        # "" or a missing file: no held-out rows
    template: str
    base: str
    model: str       # output dir (adapter or full weights)
    metrics: str
    loss: str
    plot: str = ""   # the objective's step histories (rewards, margins ...); default rewards.png beside metrics

    @property
    def checkpoints(self) -> Path:
        return Path(self.metrics).parent / "checkpoints"

    @property
    def histories_plot(self) -> Path:
        return Path(self.plot) if self.plot else Path(self.metrics).with_name("rewards.png")


# ---------------------------------------------------------------- shared by the objectives

@dataclass
class Setup:
    method: Any
    objective: Any
    args: dict[str, Any]
    cuda: bool
    tokenizer: Any
    grow_vocab: bool


def check_base(base: str | Path) -> None:
    """The base is always a local folder here (resources/models/<slug>, or the merged model of the
    recipe this one chains on); missing or emptied, transformers would call it an invalid hub id."""
    folder = Path(base)
    chained = "the merged model of the recipe this one chains on (model.base: recipe:...); " \
        if folder.parts[-2:] == ("model", "merged") else ""
    if not folder.is_dir():
        raise TunesmithError(f"{folder}: the base model folder is missing: {chained}rerun the workflow, "
                             "which rebuilds it, or restore it")
    if not (folder / "config.json").is_file():
        raise TunesmithError(f"{folder}: not a model folder (no config.json): {chained}delete it and rerun the "
                             "workflow to rebuild it")


def setup(base: str, template: str | None, section: dict[str, Any]) -> Setup:
    """Method, objective, device, seed and tokenizer: before anything heavy (GPU methods stop here on CPU)."""
    train_cfg, model_cfg = section["train"], section["model"]
    method = methods.get(train_cfg["method"])
    objective = objectives.get(train_cfg["objective"])
    cuda = methods.require_device(method.name)
    check_base(base)
    if method.import_first:
        importlib.import_module(method.import_first)  # before transformers/trl, which it patches

    from transformers import set_seed

    set_seed(train_cfg["args"]["seed"])
    tokenizer, grow_vocab = contract.load_tokenizer(base, template, model_cfg)
    log.info("tokenizer: eos %r (id %s), pad %r (id %s)%s", tokenizer.eos_token, tokenizer.eos_token_id,
             tokenizer.pad_token, tokenizer.pad_token_id, " (added)" if grow_vocab else "")
    return Setup(method, objective, train_cfg["args"], cuda, tokenizer, grow_vocab)


def load_model(s: Setup, base: str, section: dict[str, Any]) -> tuple[Any, float]:
    load_started = time.time()
    model = s.method.load(base, section, s.cuda, s.tokenizer, s.grow_vocab)
    load_seconds = time.time() - load_started
    counts = histories.parameter_counts(model)
    log.info("method %s on %s: %d of %d parameters trainable (%.2f%%)", s.method.name, "cuda" if s.cuda else "cpu",
             counts["trainable_params"], counts["total_params"], 100 * counts["trainable_share"])
    return model, load_seconds


def saver(s: Setup, base: str) -> Any:
    """(trainer, tmp folder) -> the model folder: weights or adapter, tokenizer, TRAIN_INFO."""
    def save(trainer: Any, tmp: Path) -> None:
        trainer.save_model(str(tmp))
        if not trainer.is_world_process_zero():
            return
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the folder holds safetensors and JSON
        switch_off_padding(s.tokenizer)
        s.tokenizer.save_pretrained(str(tmp))
        info = {"method": s.method.name, "objective": s.objective.NAME, "base": str(Path(base).resolve()),
                "adapter": s.method.adapter, "pad_token": s.tokenizer.pad_token, "vocab_grown": s.grow_vocab,
                "steps": int(trainer.state.global_step), "max_length": s.args["max_length"]}
        (tmp / TRAIN_INFO).write_text(json.dumps(info, indent=2))
    return save


def _fingerprint(paths: Any, section: dict[str, Any]) -> str:
    """What a checkpoint must match to be resumed: the section and the files read (TrainPaths)."""
    return checkpoints.fingerprint(section, {"train": paths.train, "eval": paths.eval, "template": paths.template,
                                          "base": paths.base})


def train(paths: TrainPaths, section: dict[str, Any]) -> Result:
    """Train for section.train.objective, write model/metrics/plots atomically, return the stage's Result."""
    s = setup(paths.base, paths.template, section)
    plan = s.objective.prepare(s, paths, section)  # reads and checks the rows before the model loads
    model, load_seconds = load_model(s, paths.base, section)
    kwargs = plan.trainer_kwargs(model) if callable(plan.trainer_kwargs) else plan.trainer_kwargs
    objective, method, tokenizer = s.objective, s.method, s.tokenizer
    return trainer_loop.fit(trainer_loop.Fit(
        objective=objective, model=model, tokenizer=tokenizer, train_dataset=plan.train, eval_dataset=plan.eval,
        args=s.args, method=method, cuda=s.cuda, checkpoints=paths.checkpoints,
        fingerprint=_fingerprint(paths, section), model_out=Path(paths.model), metrics_path=Path(paths.metrics),
        loss_path=Path(paths.loss), title=f"{method.name} on {Path(paths.base).name}", save=saver(s, paths.base),
        before_train=plan.before_train, settings=plan.settings or {}, trainer_kwargs=kwargs,
        histories_path=paths.histories_plot if plan.settings is not None else None,
        extra_metrics={"base": str(paths.base), "load_seconds": load_seconds, "pad_token": tokenizer.pad_token,
                       "eos_token": tokenizer.eos_token, **plan.metrics}))
