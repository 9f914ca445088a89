"""The train stage: a base model, adapted by a method (tunesmith.methods), trained for an
objective (tunesmith.objectives) through the one loop (tunesmith.trainer).

- train_sft: loss on responses only. Examples are tokenised here into input_ids + labels (prompt
  masked), the template/EOS contract gate checks those labels as the collator will batch them, and
  trl trains on exactly them.
- train_preference (dpo, kto): canonical preference rows; trl renders and tokenises them, and the
  pair contract gate checks that rendering and the trainer's collator before step one.
- train_grpo: prompts with reference answers; the recipe's rewards (tunesmith.rewards) score the
  completions the model samples.

Checkpoints go next to the metrics file (not a declared output, so they survive a crash) and a
rerun resumes from the newest complete one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith import contract, methods, objectives, trainkit
from tunesmith import trainer as trainer_loop
from tunesmith.data import preference
from tunesmith.data.formatting import read_split
from tunesmith.data.tokens import switch_off_padding
from tunesmith.errors import TunesmithError
from tunesmith.result import Result

log = logging.getLogger("tunesmith.train")

# Tokens that models ship for padding; used before falling back to unk or adding a new one.
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|padding|>")
TRAIN_INFO = "tunesmith_train.json"


@dataclass
class SFTPaths:
    train: str
    eval: str
    template: str
    base: str
    model: str       # output dir (adapter or full weights)
    metrics: str
    loss: str

    @property
    def checkpoints(self) -> Path:
        return Path(self.metrics).parent / "checkpoints"


# ---------------------------------------------------------------- tokenizer

def ensure_distinct_pad(tokenizer: Any, requested: str | None = None) -> bool:
    """Give the tokenizer a pad token that is not EOS. Returns True when a new token was added
    (the model's embeddings must then grow). Padding with EOS is how EOS gets masked out of the
    labels by collators that mask pad positions: the model then never learns to stop."""
    eos = tokenizer.eos_token
    vocab = tokenizer.get_vocab()
    if requested:
        if requested == eos:
            raise TunesmithError(f"model.pad_token is the EOS token {eos!r}; pick a distinct one")
        added = requested not in vocab
        if added:
            tokenizer.add_special_tokens({"pad_token": requested})
        tokenizer.pad_token = requested
        return added
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return False
    for cand in PAD_CANDIDATES:
        if cand in vocab and cand != eos:
            tokenizer.pad_token = cand
            return False
    if tokenizer.unk_token is not None and tokenizer.unk_token != eos:
        tokenizer.pad_token = tokenizer.unk_token
        return False
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return True


def load_tokenizer(base: str | Path, template_path: str | Path | None, model_cfg: dict[str, Any]) -> tuple[Any, bool]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base), trust_remote_code=bool(model_cfg["trust_remote_code"]))
    if template_path:
        text = Path(template_path).read_text(encoding="utf-8")
        if not text.strip():
            raise TunesmithError(f"{template_path}: chat template is empty")
        tokenizer.chat_template = text
    if not getattr(tokenizer, "chat_template", None):
        raise TunesmithError(f"{base}: the tokenizer has no chat template and none was given")
    tokenizer.model_max_length = int(model_cfg["max_length"])
    added = ensure_distinct_pad(tokenizer, model_cfg["pad_token"])
    tokenizer.padding_side = "right"
    return tokenizer, added


# ---------------------------------------------------------------- shared by the objectives

@dataclass
class Setup:
    method: Any
    objective: Any
    args: dict[str, Any]
    cuda: bool
    tokenizer: Any
    grow_vocab: bool


def setup(base: str, template: str | None, section: dict[str, Any]) -> Setup:
    """Method, objective, device, seed and tokenizer: before anything heavy (GPU methods stop here on CPU)."""
    train_cfg, model_cfg = section["train"], section["model"]
    method = methods.get(train_cfg["method"])
    objective = objectives.get(train_cfg["objective"])
    cuda = trainkit.require_device(method.name)
    if method.name == "unsloth":
        import unsloth  # noqa: F401  (must be imported before transformers/trl to patch them)

    from transformers import set_seed

    set_seed(train_cfg["args"]["seed"])
    tokenizer, grow_vocab = load_tokenizer(base, template, model_cfg)
    log.info("tokenizer: eos %r (id %s), pad %r (id %s)%s", tokenizer.eos_token, tokenizer.eos_token_id,
             tokenizer.pad_token, tokenizer.pad_token_id, " (added)" if grow_vocab else "")
    return Setup(method, objective, train_cfg["args"], cuda, tokenizer, grow_vocab)


def load_model(s: Setup, base: str, section: dict[str, Any]) -> tuple[Any, float]:
    load_started = time.time()
    model = s.method.load(base, section, s.cuda, s.tokenizer, s.grow_vocab)
    load_seconds = time.time() - load_started
    counts = trainkit.parameter_counts(model)
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
    """What a checkpoint must match to be resumed: the section and the files read (SFTPaths or ObjectivePaths)."""
    return trainkit.fingerprint(section, {"train": paths.train, "eval": paths.eval, "template": paths.template,
                                          "base": paths.base})


# ---------------------------------------------------------------- sft

def train_sft(paths: SFTPaths, section: dict[str, Any]) -> Result:
    """Train, write model/metrics/plot atomically, return the stage's Result."""
    if section["train"]["objective"] != "sft":
        raise TunesmithError(f"train_sft trains objective sft; train.objective '{section['train']['objective']}' "
                             f"trains through {'train_grpo' if section['train']['objective'] == 'grpo' else 'train_preference'}")
    s = setup(paths.base, paths.template, section)
    args, tokenizer = s.args, s.tokenizer
    train_rows = read_split(paths.train)
    eval_rows = read_split(paths.eval) if paths.eval and Path(paths.eval).is_file() else []
    max_length = args["max_length"]
    train_examples = contract.tokenize_rows(tokenizer, train_rows, max_length)
    eval_examples = contract.tokenize_rows(tokenizer, eval_rows, max_length)
    model, load_seconds = load_model(s, paths.base, section)

    def gate(trainer: Any) -> None:
        # The gate sees the labels as the trainer's own collator batches them, before step one.
        gen = getattr(model, "generation_config", None)
        for name, examples, batch in (("train", train_examples, args["per_device_train_batch_size"]),
                                      ("eval", eval_examples, args["per_device_eval_batch_size"])):
            if examples:
                contract.gate(examples, tokenizer, collator=trainer.data_collator, generation_config=gen,
                              max_length=max_length, batch_size=batch, name=name)
        log.info("contract gate passed: %d train and %d eval examples end with a supervised %r",
                 len(train_examples), len(eval_examples), tokenizer.eos_token)

    objective, method = s.objective, s.method
    return trainer_loop.fit(trainer_loop.Fit(
        objective=objective, model=model, tokenizer=tokenizer, train_dataset=objective.dataset(train_examples),
        eval_dataset=objective.dataset(eval_examples) if eval_examples else None, args=args, method=method,
        cuda=s.cuda, checkpoints=paths.checkpoints, fingerprint=_fingerprint(paths, section), model_out=Path(paths.model),
        metrics_path=Path(paths.metrics), loss_path=Path(paths.loss), title=f"{method.name} on {Path(paths.base).name}",
        save=saver(s, paths.base), before_train=gate, trainer_kwargs={"token_metrics": bool(args["token_metrics"])},
        extra_metrics={"base": str(paths.base), "load_seconds": load_seconds, "pad_token": tokenizer.pad_token,
                       "eos_token": tokenizer.eos_token, "packing": bool(args["packing"])}))


# ---------------------------------------------------------------- dpo, kto, grpo

@dataclass
class ObjectivePaths:
    """The files of a dpo, kto or grpo train job. train/eval: canonical preference rows
    (tunesmith.data.preference) for dpo/kto, prompt rows with reference answers for grpo."""

    train: str
    eval: str        # "" or a missing file: no held-out rows (grpo never reads one)
    template: str
    base: str
    model: str       # output dir (adapter or full weights)
    metrics: str
    loss: str
    plot: str        # the objective's step histories: rewards, margins, accuracies / reward mean and std

    @property
    def checkpoints(self) -> Path:
        return Path(self.metrics).parent / "checkpoints"


def read_preference_split(path: str, objective: str) -> list[dict[str, Any]]:
    """Canonical rows for dpo (pairs) or kto (unpaired rows; pairs are split into one of each label)."""
    rows, info = preference.load_preference(path)
    if objective == "kto":
        return preference.unpair(rows)
    if info["kind"] != "pairs":
        raise TunesmithError(f"{path}: train.objective dpo needs chosen/rejected pairs, but this file holds "
                             f"{info['layout']} rows (prompt/completion/label); use objective kto for them")
    return rows


def train_preference(paths: ObjectivePaths, section: dict[str, Any]) -> Result:
    """dpo or kto: read canonical preference rows, gate the pairs, train through the one loop."""
    name = section["train"]["objective"]
    if name not in ("dpo", "kto"):
        raise TunesmithError(f"train_preference trains objective dpo or kto, not '{name}'")
    s = setup(paths.base, paths.template, section)
    args, tokenizer, settings = s.args, s.tokenizer, section["train"][name]
    train_rows = read_preference_split(paths.train, name)
    eval_rows = read_preference_split(paths.eval, name) if paths.eval and Path(paths.eval).is_file() else []
    model, load_seconds = load_model(s, paths.base, section)
    ref_model = None
    if settings["reference"] == "model" and not s.method.adapter:
        # full: the reference is a second, frozen copy of the base, loaded as the policy was (same
        # pad token and vocabulary); adapter methods disable their adapter instead.
        ref_model = methods.load_reference(paths.base, section, s.cuda, tokenizer, s.grow_vocab)

    def gate(trainer: Any) -> None:
        gen = getattr(model, "generation_config", None)
        for split, rows, batch in (("train", train_rows, args["per_device_train_batch_size"]),
                                   ("eval", eval_rows, args["per_device_eval_batch_size"])):
            if rows:
                contract.pair_gate(rows, tokenizer, collator=trainer.data_collator, generation_config=gen,
                                   max_length=args["max_length"], batch_size=batch, name=split)
        log.info("pair contract passed: %d train and %d eval rows; every prompt renders the same before each "
                 "completion, and each completion ends with a supervised %r", len(train_rows), len(eval_rows),
                 tokenizer.eos_token)

    objective, method = s.objective, s.method
    counts = _label_counts(train_rows) if name == "kto" else {"train_pairs": len(train_rows)}
    return trainer_loop.fit(trainer_loop.Fit(
        objective=objective, model=model, tokenizer=tokenizer, train_dataset=objective.dataset(train_rows),
        eval_dataset=objective.dataset(eval_rows) if eval_rows else None, args=args, method=method,
        cuda=s.cuda, checkpoints=paths.checkpoints, fingerprint=_fingerprint(paths, section),
        model_out=Path(paths.model), metrics_path=Path(paths.metrics), loss_path=Path(paths.loss),
        title=f"{method.name} on {Path(paths.base).name}", save=saver(s, paths.base), before_train=gate,
        settings=settings, trainer_kwargs={"ref_model": ref_model}, histories_path=Path(paths.plot),
        extra_metrics={"base": str(paths.base), "load_seconds": load_seconds, "pad_token": tokenizer.pad_token,
                       "eos_token": tokenizer.eos_token, "beta": settings["beta"], "loss_type": settings["loss_type"],
                       "reference": settings["reference"], **counts}))


def _label_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    desirable = sum(1 for r in rows if r["label"])
    return {"train_desirable": desirable, "train_undesirable": len(rows) - desirable}


def train_grpo(paths: ObjectivePaths, section: dict[str, Any]) -> Result:
    """grpo: prompts with reference answers; the model samples, the recipe's rewards score."""
    from tunesmith import rewards

    if section["train"]["objective"] != "grpo":
        raise TunesmithError(f"train_grpo trains objective grpo, not '{section['train']['objective']}'")
    settings = section["train"]["grpo"]
    args = section["train"]["args"]
    per_step = args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] * trainkit.world_size()
    if per_step % settings["num_generations"]:
        raise TunesmithError(f"train.grpo.num_generations ({settings['num_generations']}) must divide the completions "
                             f"per optimizer step, train.args.per_device_train_batch_size x gradient_accumulation_steps "
                             f"(x GPUs) = {per_step}: each step scores whole groups")
    weights = settings["reward_weights"]
    if weights is not None and len(weights) != len(settings["rewards"]):
        raise TunesmithError(f"train.grpo.reward_weights has {len(weights)} weights for {len(settings['rewards'])} "
                             f"rewards ({', '.join(settings['rewards'])})")
    funcs = rewards.resolve(settings["rewards"], settings["format_pattern"])  # before the model loads
    s = setup(paths.base, paths.template, section)
    tokenizer = s.tokenizer
    if settings["beta"] > 0 and not s.method.adapter and s.grow_vocab:
        raise TunesmithError("train.grpo.beta > 0 with method full loads the reference from the base folder, whose "
                             "vocabulary lacks the pad token added here; set model.pad_token to a token the "
                             "tokenizer has, or beta: 0")
    rows = preference.load_prompts(paths.train, settings["answer_field"])
    contract.prompt_gate(rows, tokenizer)
    model, load_seconds = load_model(s, paths.base, section)
    objective, method = s.objective, s.method
    return trainer_loop.fit(trainer_loop.Fit(
        objective=objective, model=model, tokenizer=tokenizer, train_dataset=objective.dataset(rows),
        eval_dataset=None, args=args, method=method, cuda=s.cuda, checkpoints=paths.checkpoints,
        fingerprint=_fingerprint(paths, section), model_out=Path(paths.model), metrics_path=Path(paths.metrics),
        loss_path=Path(paths.loss), title=f"{method.name} on {Path(paths.base).name}", save=saver(s, paths.base),
        settings=settings, trainer_kwargs={"reward_funcs": funcs}, histories_path=Path(paths.plot),
        extra_metrics={"base": str(paths.base), "load_seconds": load_seconds, "pad_token": tokenizer.pad_token,
                       "eos_token": tokenizer.eos_token, "rewards": list(settings["rewards"]),
                       "num_generations": settings["num_generations"], "train_prompts": len(rows)}))
