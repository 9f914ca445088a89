"""The pretrain-from-scratch path: a ByteLevel BPE tokenizer trained with `tokenizers`, a Llama
built from the recipe's config, causal-LM training on a local corpus. The model folder it writes
is a base model for the SFT chain (`model.base: pretrained`)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tunesmith import trainkit
from tunesmith.data.corpus import iter_corpus
from tunesmith.errors import DataError, TunesmithError
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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tunesmith.fileio import replace_dir

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
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
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


def pretrain(*, tokenizer_dir: str | Path, section: dict[str, Any], model_out: str | Path, metrics_path: str | Path,
             loss_path: str | Path) -> Result:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM, set_seed

    from tunesmith import methods, objectives
    from tunesmith import trainer as trainer_loop

    pre = section["pretrain"]
    args = pre["args"]
    method, objective = methods.get("full"), objectives.get("causal-lm")
    cuda = trainkit.require_device(method.name)
    set_seed(args["seed"])
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise TunesmithError(f"{tokenizer_dir}: the tokenizer needs a pad token distinct from EOS")
    block = min(args["max_length"], pre["model"]["max_position_embeddings"])
    all_blocks = blocks(tokenizer, list(iter_corpus(pre["corpus"])), block)
    n_eval = min(max(1, len(all_blocks) // 20), 64) if len(all_blocks) > 1 else 0
    eval_blocks, train_blocks = all_blocks[:n_eval], all_blocks[n_eval:]

    config = llama_config(pre["model"], tokenizer)
    torch.manual_seed(args["seed"])
    model = LlamaForCausalLM(config)
    end_ids = [tokenizer.eos_token_id] + [i for i in [tokenizer.convert_tokens_to_ids(END)]
                                          if i is not None and i != tokenizer.unk_token_id]
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=end_ids,
                                               pad_token_id=tokenizer.pad_token_id)
    counts = trainkit.parameter_counts(model)
    log.info("Llama from scratch: %d parameters, vocab %d, %d train / %d eval blocks of %d tokens",
             counts["total_params"], config.vocab_size, len(train_blocks), len(eval_blocks), block)

    def save(trainer: Any, tmp: Path) -> None:
        if not trainer.is_world_process_zero():
            return
        trainer.model.to(torch.bfloat16).save_pretrained(str(tmp), safe_serialization=True)
        trainer.model.generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "tunesmith_source.json").write_text(json.dumps({"source": "pretrained", "kind": "pretrain",
                                                               "tokenizer": str(tokenizer_dir)}))

    fingerprint = trainkit.fingerprint(section, {"tokenizer": tokenizer_dir, "corpus": pre["corpus"]["source"]})
    return trainer_loop.fit(trainer_loop.Fit(
        objective=objective, model=model, tokenizer=tokenizer, train_dataset=objective.dataset(train_blocks),
        eval_dataset=objective.dataset(eval_blocks) if eval_blocks else None, args=args, method=method, cuda=cuda,
        checkpoints=Path(metrics_path).parent / "checkpoints", fingerprint=fingerprint, model_out=Path(model_out),
        metrics_path=Path(metrics_path), loss_path=Path(loss_path), title="pretrain from scratch", save=save,
        extra_metrics={"train_blocks": len(train_blocks), "eval_blocks": len(eval_blocks), "block_size": block,
                       "vocab_size": config.vocab_size}))
