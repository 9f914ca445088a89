"""Supervised fine-tuning: full / LoRA / QLoRA / Unsloth with trl's SFTTrainer.

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

from tunesmith import contract, trainkit
from tunesmith.errors import DataError, TunesmithError

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


# ---------------------------------------------------------------- data

def _check_messages(value: Any, path: str, line: int, field: str, roles: tuple[str, ...]) -> None:
    if not isinstance(value, list) or not value:
        raise DataError(f"{path}, row {line}, field '{field}': expected a non-empty list of messages")
    for j, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or msg.get("role") not in roles:
            raise DataError(f"{path}, row {line}, field '{field}[{j}]': expected {{'role': one of {list(roles)}, "
                            f"'content': text}}, got {str(msg)[:120]!r}")


def read_conversations(path: str | Path) -> list[dict[str, Any]]:
    """Rows of the format stage: {"id", "prompt": [messages], "completion": [assistant message]}."""
    path = str(path)
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, row {line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, row {line_no}: expected an object")
            for field in ("prompt", "completion"):
                if field not in row:
                    raise DataError(f"{path}, row {line_no}: missing field '{field}'")
            _check_messages(row["prompt"], path, line_no, "prompt", ("system", "user", "assistant", "tool"))
            _check_messages(row["completion"], path, line_no, "completion", ("assistant",))
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


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

    tokenizer = AutoTokenizer.from_pretrained(str(base), trust_remote_code=bool(model_cfg.get("trust_remote_code")))
    if template_path:
        text = Path(template_path).read_text(encoding="utf-8")
        if not text.strip():
            raise TunesmithError(f"{template_path}: chat template is empty")
        tokenizer.chat_template = text
    if not getattr(tokenizer, "chat_template", None):
        raise TunesmithError(f"{base}: the tokenizer has no chat template and none was given")
    tokenizer.model_max_length = int(model_cfg.get("max_length") or 2048)
    added = ensure_distinct_pad(tokenizer, model_cfg.get("pad_token"))
    tokenizer.padding_side = "right"
    return tokenizer, added


# ---------------------------------------------------------------- model

def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the linear layers LoRA can target (GPT-2's Conv1D counts), without the LM head."""
    import torch

    kinds: tuple[type, ...] = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds += (Conv1D,)
    except ImportError:  # pragma: no cover
        pass
    try:
        import bitsandbytes as bnb

        kinds += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except Exception:  # noqa: BLE001 - bitsandbytes is optional on CPU
        pass
    names = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if isinstance(module, kinds) and module is not output:
            names.add(name.split(".")[-1])
    return sorted(names)


def check_target_modules(model: Any, targets: str | list[str]) -> str | list[str]:
    if targets == "all-linear":
        return targets
    if isinstance(targets, str):
        targets = [targets]
    have = linear_module_names(model)
    missing = [t for t in targets if t not in have]
    if missing:
        raise TunesmithError(
            f"train.lora.target_modules names {missing} but this model has no such linear layers. "
            f"Its linear modules are: {', '.join(have)} (or use 'all-linear')")
    return list(targets)


def resolve_dtype(name: str, cuda: bool):
    import torch

    if name == "auto":
        if cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def lora_config(lora: dict[str, Any], targets: str | list[str]):
    from peft import LoraConfig

    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=targets, use_dora=lora["use_dora"], bias=lora["bias"],
                      task_type="CAUSAL_LM")


def load_model(base: str | Path, section: dict[str, Any], cuda: bool, tokenizer: Any, grow_vocab: bool) -> Any:
    """The model the trainer gets: plain (full), LoRA-wrapped, 4-bit + LoRA (qlora) or Unsloth's."""
    import torch
    from transformers import AutoModelForCausalLM

    model_cfg, train_cfg = section["model"], section["train"]
    method = train_cfg["method"]
    trust = bool(model_cfg.get("trust_remote_code"))
    dtype = resolve_dtype(model_cfg.get("dtype", "auto"), cuda)
    gc = bool(train_cfg["args"]["gradient_checkpointing"])
    if method == "unsloth":
        return _load_unsloth(base, section, tokenizer)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust, "use_safetensors": True}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        q = train_cfg["quantization"]
        compute = getattr(torch, q["compute_dtype"])
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q["quant_type"], bnb_4bit_use_double_quant=q["double_quant"],
            bnb_4bit_compute_dtype=compute)
        kwargs["dtype"] = compute
        kwargs["device_map"] = {"": trainkit.local_rank()}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), **kwargs)
    except OSError as exc:
        raise TunesmithError(f"could not load base model from {base}: {str(exc).splitlines()[0]}") from None
    if grow_vocab:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if method == "full":
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    targets = check_target_modules(model, train_cfg["lora"]["target_modules"])
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, lora_config(train_cfg["lora"], targets))


def _load_unsloth(base: str | Path, section: dict[str, Any], tokenizer: Any) -> Any:
    # Imported only here, after the CUDA check: unsloth raises at import time without a GPU.
    from unsloth import FastLanguageModel

    train_cfg = section["train"]
    lora = train_cfg["lora"]
    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(base), max_seq_length=train_cfg["args"]["max_length"], dtype=None, load_in_4bit=True,
        trust_remote_code=bool(section["model"].get("trust_remote_code")))
    targets = lora["target_modules"]
    if targets == "all-linear":
        targets = [n for n in linear_module_names(model)]
    else:
        targets = check_target_modules(model, targets)
    model = FastLanguageModel.get_peft_model(
        model, r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], bias=lora["bias"],
        target_modules=targets, use_gradient_checkpointing="unsloth", use_dora=lora["use_dora"],
        random_state=train_cfg["args"]["seed"], max_seq_length=train_cfg["args"]["max_length"])
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------- trainer

def sft_config(args: dict[str, Any], method: str, output_dir: Path, cuda: bool, has_eval: bool):
    from trl import SFTConfig

    bf16 = args.get("bf16")
    fp16 = bool(args.get("fp16"))
    if cuda:
        import torch

        if bf16 is None:
            bf16 = bool(torch.cuda.is_bf16_supported()) and not fp16
    else:
        if bf16 or fp16:
            log.warning("bf16/fp16 mixed precision is GPU-only; training in fp32 on CPU")
        bf16, fp16 = False, False
    optim = args.get("optim") or ("paged_adamw_8bit" if method == "qlora" else "adamw_torch")
    if optim in ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit") and not cuda:
        raise TunesmithError(f"train.args.optim '{optim}' needs bitsandbytes on CUDA; use adamw_torch on CPU")
    gc = bool(args["gradient_checkpointing"]) and method != "unsloth"  # unsloth patches its own
    eval_steps = args.get("eval_steps")
    return SFTConfig(
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
        max_length=args["max_length"],
        packing=bool(args["packing"]),
        gradient_checkpointing=gc,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gc else None,
        logging_steps=args["logging_steps"],
        logging_first_step=True,
        eval_strategy="steps" if (eval_steps and has_eval) else "no",
        eval_steps=eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=args["save_steps"],
        save_total_limit=args["save_total_limit"],
        seed=args["seed"],
        data_seed=args["seed"],
        bf16=bf16,
        fp16=fp16,
        use_cpu=not cuda,
        report_to="none",  # MLflow is written by tunesmith.tracking; trainer integrations would log env/args
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def _dataset(examples: list[dict[str, Any]]):
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])


def build_trainer(model: Any, tokenizer: Any, config: Any, train_examples: list[dict[str, Any]],
                  eval_examples: list[dict[str, Any]], callbacks: list[Any]):
    from trl import SFTTrainer

    return SFTTrainer(model=model, args=config, train_dataset=_dataset(train_examples),
                      eval_dataset=_dataset(eval_examples) if eval_examples else None,
                      processing_class=tokenizer, callbacks=callbacks)


# ---------------------------------------------------------------- the stage

def train_sft(paths: SFTPaths, section: dict[str, Any], record: Any = None) -> dict[str, Any]:
    """Train, write model/metrics/plot atomically, return the metrics dict."""
    started = time.time()
    train_cfg, model_cfg = section["train"], section["model"]
    method = train_cfg["method"]
    args = train_cfg["args"]
    cuda = trainkit.require_device(method)  # before anything heavy: GPU methods stop here on CPU
    if method == "unsloth":
        import unsloth  # noqa: F401  (must be imported before transformers/trl to patch them)

    import torch
    from transformers import set_seed

    set_seed(args["seed"])
    train_rows = read_conversations(paths.train)
    eval_rows = read_conversations(paths.eval) if paths.eval and Path(paths.eval).is_file() else []
    tokenizer, grow_vocab = load_tokenizer(paths.base, paths.template, model_cfg)
    log.info("tokenizer: eos %r (id %s), pad %r (id %s)%s", tokenizer.eos_token, tokenizer.eos_token_id,
             tokenizer.pad_token, tokenizer.pad_token_id, " (added)" if grow_vocab else "")
    max_length = args["max_length"]
    train_examples = contract.tokenize_rows(tokenizer, train_rows, max_length)
    eval_examples = contract.tokenize_rows(tokenizer, eval_rows, max_length)

    load_started = time.time()
    model = load_model(paths.base, section, cuda, tokenizer, grow_vocab)
    load_seconds = time.time() - load_started
    counts = trainkit.parameter_counts(model)
    log.info("method %s on %s: %d of %d parameters trainable (%.2f%%)", method, "cuda" if cuda else "cpu",
             counts["trainable_params"], counts["total_params"], 100 * counts["trainable_share"])

    ckpt_dir = paths.checkpoints
    fp = trainkit.fingerprint(section, {"train": paths.train, "eval": paths.eval, "template": paths.template,
                                        "base": paths.base})
    resume = trainkit.prepare_checkpoints(ckpt_dir, fp) if trainkit.world_rank() == 0 else trainkit.last_checkpoint(ckpt_dir)
    config = sft_config(args, method, ckpt_dir, cuda, bool(eval_examples))
    history = trainkit.make_history_callback()
    trainer = build_trainer(model, tokenizer, config, train_examples, eval_examples, [history])

    # The gate sees the labels as the trainer's own collator batches them, before step one.
    contract.gate(train_examples, tokenizer, collator=trainer.data_collator,
                  generation_config=getattr(model, "generation_config", None), max_length=max_length,
                  batch_size=args["per_device_train_batch_size"], name="train")
    if eval_examples:
        contract.gate(eval_examples, tokenizer, collator=trainer.data_collator,
                      generation_config=getattr(model, "generation_config", None), max_length=max_length,
                      batch_size=args["per_device_eval_batch_size"], name="eval")
    log.info("contract gate passed: %d train and %d eval examples end with a supervised %r",
             len(train_examples), len(eval_examples), tokenizer.eos_token)

    initial_file = ckpt_dir / "initial_eval.json"
    initial_eval = None
    if eval_examples:
        if resume is None or not initial_file.is_file():
            initial_eval = float(trainer.evaluate()["eval_loss"])
            if trainkit.world_rank() == 0:
                initial_file.write_text(json.dumps({"eval_loss": initial_eval}))
        else:
            initial_eval = float(json.loads(initial_file.read_text())["eval_loss"])
        log.info("eval loss before training: %.4f", initial_eval)

    resumed_from = 0
    if resume is not None:
        resumed_from = trainkit.checkpoint_step(resume)
        log.info("resuming from checkpoint %s (global_step %d)", resume, resumed_from)
    else:
        log.info("no checkpoint in %s: training from step 0", ckpt_dir)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tokens_before = 0
    if resume is not None:
        tokens_before = int(json.loads((resume / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0))
    train_started = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_seconds = time.time() - train_started
    final_eval = float(trainer.evaluate()["eval_loss"]) if eval_examples else None

    steps_run = trainer.state.global_step - resumed_from
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0) - tokens_before
    train_hist, eval_hist = trainkit.full_history(trainer)
    if final_eval is not None:
        eval_hist = [e for e in eval_hist if e[0] != trainer.state.global_step] + [(trainer.state.global_step, final_eval)]
    if initial_eval is not None:
        eval_hist = [(0, initial_eval)] + [e for e in eval_hist if e[0] != 0]

    metrics: dict[str, Any] = {
        "method": method,
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "base": str(paths.base),
        "train_rows": len(train_examples),
        "eval_rows": len(eval_examples),
        "train_loss": float(result.training_loss),
        "train_loss_first": train_hist[0][1] if train_hist else None,
        "train_loss_last": train_hist[-1][1] if train_hist else None,
        "eval_loss_initial": initial_eval,
        "eval_loss": final_eval,
        "steps": int(trainer.state.global_step),
        "steps_this_run": int(steps_run),
        "resumed_from_step": int(resumed_from),
        "epochs": float(trainer.state.epoch or 0.0),
        "tokens_this_run": tokens,
        "tokens_per_second": tokens / train_seconds if train_seconds > 0 else 0.0,
        "seconds_per_step": train_seconds / steps_run if steps_run else None,
        "train_seconds": train_seconds,
        "load_seconds": load_seconds,
        "wall_seconds": None,  # filled below, once the model is saved
        **counts,
        **trainkit.peak_memory_mb(cuda),
        "pad_token": tokenizer.pad_token,
        "eos_token": tokenizer.eos_token,
        "packing": bool(args["packing"]),
        "loss_history": [{"step": s, "loss": v} for s, v in train_hist],
        "eval_history": [{"step": s, "eval_loss": v} for s, v in eval_hist],
    }

    import shutil

    out = Path(paths.model)
    tmp = out.with_name(f".{out.name}.tmp")
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))  # every rank calls it (sharded setups gather); only rank 0 writes
    if not trainer.is_world_process_zero():
        return metrics
    # A pickle; the model folder holds safetensors and JSON only.
    (tmp / "training_args.bin").unlink(missing_ok=True)
    tokenizer.save_pretrained(str(tmp))
    info = {"method": method, "base": str(Path(paths.base).resolve()), "adapter": method != "full",
            "pad_token": tokenizer.pad_token, "vocab_grown": grow_vocab, "steps": metrics["steps"],
            "max_length": max_length}
    (tmp / TRAIN_INFO).write_text(json.dumps(info, indent=2))
    from tunesmith.fileio import replace_dir, write_json

    replace_dir(tmp, paths.model)
    metrics["wall_seconds"] = time.time() - started
    trainkit.plot_loss(train_hist, eval_hist, paths.loss,
                       f"{method} on {Path(paths.base).name}: {metrics['steps']} steps")
    write_json(paths.metrics, metrics)
    if record is not None:
        trainkit.log_training(record, metrics, train_hist, eval_hist, [paths.metrics, paths.loss])
        record.set_tag("tunesmith.train.method", method)
        record.set_tag("tunesmith.train.device", metrics["device"])
    return metrics
