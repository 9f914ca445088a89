"""kind: pretrain. From scratch (`model.base: pretrained`): a ByteLevel BPE tokenizer trained with
`tokenizers` and a Llama built from the recipe's config. Continued (any other model.base): that
model with its own tokenizer. Either way, causal-LM training on a local corpus cut into full
blocks; the model folder it writes is the base of the recipe's SFT chain."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tunesmith import checkpoints, histories, methods, objectives
from tunesmith import trainer as trainer_loop
from tunesmith.data.corpus import iter_corpus
from tunesmith.errors import DataError, TunesmithError
from tunesmith.fileio import replace_dir
from tunesmith.result import Result

log = logging.getLogger("tunesmith.pretrain")

# Role of each well-known special token; the rest become additional special tokens.
ROLE_OF = {"<s>": "bos_token", "</s>": "eos_token", "<pad>": "pad_token", "<unk>": "unk_token",
           "<mask>": "mask_token"}
USER, BOT, END = "<|user|>", "<|bot|>", "<|end|>"


def chat_template(user: str = USER, bot: str = BOT, end: str = END) -> str:
    """Optional leading system message, then strictly alternating user/assistant turns; anything
    else is refused at render time (raise_exception), not silently mis-rendered."""
    return (
        "{{ bos_token }}"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set loop_messages = messages[1:] %}{{ messages[0]['content'] + '\\n' }}"
        "{% else %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/... "
        "(after an optional system message)') }}"
        "{% endif %}"
        f"{{% if message['role'] == 'user' %}}{{{{ '{user}' + message['content'] + '{end}' }}}}"
        f"{{% else %}}{{{{ '{bot}' + message['content'] + '{end}' }}}}{{% endif %}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ '{bot}' }}}}{{% endif %}}"
    )


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(corpus: dict[str, Any], spec: dict[str, Any], out: str | Path, max_length: int = 512) -> dict[str, Any]:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    started = time.time()
    specials = list(spec["special_tokens"])
    if len(set(specials)) != len(specials):
        raise TunesmithError("pretrain.tokenizer.special_tokens has duplicates")
    for needed in ("</s>", "<pad>"):
        if needed not in specials:
            raise TunesmithError(f"pretrain.tokenizer.special_tokens must include {needed!r} "
                                 f"(end of document / padding distinct from it)")
    tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in specials else None))
    # Standard GPT-2-style ByteLevel: llama.cpp's converter maps it with pre-tokenizer 'gpt-2'.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=spec["vocab_size"], min_frequency=spec["min_frequency"],
                                  special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    docs = list(iter_corpus(corpus))
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    roles = {ROLE_OF[t]: t for t in specials if t in ROLE_OF}
    extra = [t for t in specials if t not in ROLE_OF]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **roles,
                                   additional_special_tokens=extra)
    if all(t in specials for t in (USER, BOT, END)):
        fast.chat_template = chat_template()
    else:
        log.warning("special tokens lack %s/%s/%s: no chat template written", USER, BOT, END)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    fast.save_pretrained(str(tmp))
    replace_dir(tmp, out)
    sample = docs[: min(len(docs), 2000)]
    n_tokens = sum(len(ids) for ids in fast(sample, add_special_tokens=False)["input_ids"])
    return {"vocab_size": len(fast), "requested_vocab_size": spec["vocab_size"], "documents": len(docs),
            "tokens_per_document": n_tokens / max(len(sample), 1),
            "chars_per_token": sum(map(len, sample)) / max(n_tokens, 1), "seconds": time.time() - started}


# ---------------------------------------------------------------- model

def llama_config(spec: dict[str, Any], tokenizer: Any):
    from transformers import LlamaConfig

    heads = spec["num_attention_heads"]
    if spec["hidden_size"] % heads:
        raise TunesmithError(f"pretrain.model.hidden_size {spec['hidden_size']} is not divisible by "
                             f"num_attention_heads {heads}")
    kv = spec.get("num_key_value_heads") or heads
    if heads % kv:
        raise TunesmithError(f"pretrain.model.num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv,
        max_position_embeddings=spec["max_position_embeddings"], rms_norm_eps=spec["rms_norm_eps"],
        tie_word_embeddings=spec["tie_word_embeddings"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def blocks(tokenizer: Any, docs: list[str], block: int) -> list[list[int]]:
    """Documents as <s> text </s>, concatenated and cut into full blocks (no padding to learn)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is None:
        raise DataError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')}: no EOS token, so documents cannot "
                        f"be separated inside a block")
    # GPT-2-style tokenizers (bos == eos, as SmolLM2's) separate documents with that one token
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id not in (None, tokenizer.eos_token_id) else []
    for row in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(bos + row + [tokenizer.eos_token_id])
    out = [ids[i:i + block] for i in range(0, len(ids) - block + 1, block)]
    if not out:
        raise DataError(f"the corpus has {len(ids)} tokens, fewer than one block of {block} "
                        f"(pretrain.args.max_length); use a bigger corpus or a shorter max_length")
    return out


def train_tokenizer_stage(pre: dict[str, Any], out: str | Path) -> Result:
    info = train_tokenizer(pre["corpus"], pre["tokenizer"], out, max_length=pre["model"]["max_position_embeddings"])
    return Result(metrics=info, summary=f"vocab {info['vocab_size']} from {info['documents']} documents, "
                                        f"{info['chars_per_token']:.2f} chars/token")


def _scratch_model(tokenizer_dir: str | Path, pre: dict[str, Any], seed: int) -> tuple[Any, Any, int]:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise TunesmithError(f"{tokenizer_dir}: the tokenizer needs a pad token distinct from EOS")
    config = llama_config(pre["model"], tokenizer)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    end_ids = [tokenizer.eos_token_id] + [i for i in [tokenizer.convert_tokens_to_ids(END)]
                                          if i is not None and i != tokenizer.unk_token_id]
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=end_ids,
                                               pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer, pre["model"]["max_position_embeddings"]


def _base_model(base: str | Path, section: dict[str, Any], cuda: bool) -> tuple[Any, Any, int]:
    """model.base as it is: its tokenizer unchanged (no new tokens, so its embeddings and chat
    template still fit), its weights in fp32 for full training. Blocks are full, so nothing pads."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = methods.load_full(base, section, cuda, tokenizer, grow_vocab=False)
    context = getattr(model.config, "max_position_embeddings", None) or section["pretrain"]["args"]["max_length"]
    return model, tokenizer, context


def pretrain(*, section: dict[str, Any], model_out: str | Path, metrics_path: str | Path, loss_path: str | Path,
             tokenizer_dir: str | Path | None = None, base: str | Path | None = None) -> Result:
    """From scratch with tokenizer_dir (train_tokenizer's output), or continued from base (a model folder)."""
    import torch
    from transformers import set_seed

    if (tokenizer_dir is None) == (base is None):
        raise TunesmithError("pretrain needs either a tokenizer (from scratch) or a base model (continued), not both")
    pre = section["pretrain"]
    args = pre["args"]
    method, objective = methods.get("full"), objectives.get("causal-lm")
    cuda = methods.require_device(method.name)
    set_seed(args["seed"])
    if base is None:
        model, tokenizer, context = _scratch_model(tokenizer_dir, pre, args["seed"])
    else:
        model, tokenizer, context = _base_model(base, section, cuda)
    block = min(args["max_length"], context)
    all_blocks = blocks(tokenizer, list(iter_corpus(pre["corpus"])), block)
    n_eval = min(max(1, len(all_blocks) // 20), 64) if len(all_blocks) > 1 else 0
    eval_blocks, train_blocks = all_blocks[:n_eval], all_blocks[n_eval:]
    counts = histories.parameter_counts(model)
    log.info("%s: %d parameters, vocab %d, %d train / %d eval blocks of %d tokens",
             f"continuing {base}" if base else "Llama from scratch", counts["total_params"],
             model.config.vocab_size, len(train_blocks), len(eval_blocks), block)
    origin = _origin(base) if base else {"source": "pretrained", "kind": "pretrain", "tokenizer": str(tokenizer_dir)}

    def save(trainer: Any, tmp: Path) -> None:
        if not trainer.is_world_process_zero():
            return
        trainer.model.to(torch.bfloat16).save_pretrained(str(tmp), safe_serialization=True)
        trainer.model.generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "tunesmith_source.json").write_text(json.dumps(origin))

    inputs = {"base": base} if base else {"tokenizer": tokenizer_dir}
    fingerprint = checkpoints.fingerprint(section, {**inputs, "corpus": pre["corpus"]["source"]})
    return trainer_loop.fit(trainer_loop.Fit(
        objective=objective, model=model, tokenizer=tokenizer, train_dataset=objective.dataset(train_blocks),
        eval_dataset=objective.dataset(eval_blocks) if eval_blocks else None, args=args, method=method, cuda=cuda,
        checkpoints=Path(metrics_path).parent / "checkpoints", fingerprint=fingerprint, model_out=Path(model_out),
        metrics_path=Path(metrics_path), loss_path=Path(loss_path),
        title=f"continued pretraining of {Path(str(base)).name}" if base else "pretrain from scratch", save=save,
        extra_metrics={"train_blocks": len(train_blocks), "eval_blocks": len(eval_blocks), "block_size": block,
                       "vocab_size": model.config.vocab_size, "continued": bool(base)}))


def _origin(base: str | Path) -> dict[str, Any]:
    """What the model card and publish name as base_model: the model the chain started from (a hub
    id where the base folder knows it), marked as continued on a corpus."""
    info = Path(base) / "tunesmith_source.json"
    source = json.loads(info.read_text()).get("source", str(base)) if info.is_file() else str(base)
    return {"source": source, "kind": "continued-pretrain", "base": str(base)}
