"""The train stage: a base model, adapted by a method (tunesmith.methods), trained for an
objective (tunesmith.objectives) through the one loop (tunesmith.trainer).

Loss falls on responses only: examples are tokenised here into input_ids + labels (prompt masked),
the template/EOS contract gate checks those labels as the collator will batch them, and trl trains
on exactly them. Checkpoints go next to the metrics file (not a declared output, so they survive a
crash) and a rerun resumes from the newest complete one.
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
from tunesmith.data.formatting import read_split
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


# ---------------------------------------------------------------- the stage

def train_sft(paths: SFTPaths, section: dict[str, Any]) -> Result:
    """Train, write model/metrics/plot atomically, return the stage's Result."""
    train_cfg, model_cfg = section["train"], section["model"]
    method = methods.get(train_cfg["method"])
    objective = objectives.get(train_cfg["objective"])
    args = train_cfg["args"]
    cuda = trainkit.require_device(method.name)  # before anything heavy: GPU methods stop here on CPU
    if method.name == "unsloth":
        import unsloth  # noqa: F401  (must be imported before transformers/trl to patch them)

    from transformers import set_seed

    set_seed(args["seed"])
    train_rows = read_split(paths.train)
    eval_rows = read_split(paths.eval) if paths.eval and Path(paths.eval).is_file() else []
    tokenizer, grow_vocab = load_tokenizer(paths.base, paths.template, model_cfg)
    log.info("tokenizer: eos %r (id %s), pad %r (id %s)%s", tokenizer.eos_token, tokenizer.eos_token_id,
             tokenizer.pad_token, tokenizer.pad_token_id, " (added)" if grow_vocab else "")
    max_length = args["max_length"]
    train_examples = contract.tokenize_rows(tokenizer, train_rows, max_length)
    eval_examples = contract.tokenize_rows(tokenizer, eval_rows, max_length)

    load_started = time.time()
    model = method.load(paths.base, section, cuda, tokenizer, grow_vocab)
    load_seconds = time.time() - load_started
    counts = trainkit.parameter_counts(model)
    log.info("method %s on %s: %d of %d parameters trainable (%.2f%%)", method.name, "cuda" if cuda else "cpu",
             counts["trainable_params"], counts["total_params"], 100 * counts["trainable_share"])

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

    def save(trainer: Any, tmp: Path) -> None:
        trainer.save_model(str(tmp))
        if not trainer.is_world_process_zero():
            return
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the folder holds safetensors and JSON
        tokenizer.save_pretrained(str(tmp))
        info = {"method": method.name, "objective": objective.NAME, "base": str(Path(paths.base).resolve()),
                "adapter": method.adapter, "pad_token": tokenizer.pad_token, "vocab_grown": grow_vocab,
                "steps": int(trainer.state.global_step), "max_length": max_length}
        (tmp / TRAIN_INFO).write_text(json.dumps(info, indent=2))

    fingerprint = trainkit.fingerprint(section, {"train": paths.train, "eval": paths.eval, "template": paths.template,
                                                 "base": paths.base})
    return trainer_loop.fit(trainer_loop.Fit(
        objective=objective, model=model, tokenizer=tokenizer, train_dataset=objective.dataset(train_examples),
        eval_dataset=objective.dataset(eval_examples) if eval_examples else None, args=args, method=method,
        cuda=cuda, checkpoints=paths.checkpoints, fingerprint=fingerprint, model_out=Path(paths.model),
        metrics_path=Path(paths.metrics), loss_path=Path(paths.loss), title=f"{method.name} on {Path(paths.base).name}",
        save=save, before_train=gate,
        extra_metrics={"base": str(paths.base), "load_seconds": load_seconds, "pad_token": tokenizer.pad_token,
                       "eos_token": tokenizer.eos_token, "packing": bool(args["packing"])}))
