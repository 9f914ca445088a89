"""Training methods: how a model is adapted. One entry per `train.method` value of the recipe
schema (a test holds the two equal). An entry says what device it needs, how the model is loaded
and wrapped, its default optimiser, and how it merges. What the model is trained FOR is the
other axis: tunesmith.objectives.

A new method is one function and one entry here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tunesmith.errors import EnvironmentNotSupported, TunesmithError
from tunesmith.ranks import local_rank

log = logging.getLogger("tunesmith.methods")


@dataclass(frozen=True)
class Method:
    name: str
    needs_cuda: bool
    cuda_why: str               # said when it is refused on a machine without CUDA
    default_gpus: int           # what the train job asks the scheduler for when train.gpus is null
    adapter: bool               # merge = adapter into a fresh 16-bit base (else the weights are the model)
    default_optim: str
    own_gradient_checkpointing: bool  # the library patches its own; the trainer must not add HF's
    load: Callable[..., Any]    # (base, section, cuda, tokenizer, grow_vocab) -> model for the trainer
    # The base as the adapter saw it when that differs from the 16-bit base merge folds it into (qlora:
    # 4-bit), same signature as load: merge reports the merged model's distance from it.
    trained_base: Callable[..., Any] | None = None
    # A library that must be imported before transformers and trl, because it patches them (unsloth).
    import_first: str | None = None


# ---------------------------------------------------------------- loading

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
            # Emulated bf16 (T4, V100) reports True by default and then fails inside kernels.
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.float32
    return getattr(torch, name)


def lora_config(lora: dict[str, Any], targets: str | list[str]):
    from peft import LoraConfig

    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=targets, use_dora=lora["use_dora"], bias=lora["bias"],
                      task_type="CAUSAL_LM")


def _from_pretrained(base: str | Path, section: dict[str, Any], cuda: bool, tokenizer: Any, grow_vocab: bool,
                     **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    from tunesmith import attention

    attn = attention.resolve(section, cuda)
    kwargs = {"dtype": resolve_dtype(section["model"]["dtype"], cuda), "attn_implementation": attn.implementation,
              "trust_remote_code": bool(section["model"]["trust_remote_code"]), "use_safetensors": True, **kwargs}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), **kwargs)
    except OSError as exc:
        raise TunesmithError(f"could not load base model from {base}: {str(exc).splitlines()[0]}") from None
    if grow_vocab:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model._tunesmith_attention = attn  # read by the trainer loop (metrics, packed-row length); never saved
    return model


def load_full(base, section, cuda, tokenizer, grow_vocab):
    # fp32 master weights: fp16 weights cannot be unscaled by the fp16 grad scaler, and AdamW on pure
    # bf16 weights rounds small updates away. Mixed precision (train.args bf16/fp16) is autocast.
    import torch

    return _from_pretrained(base, section, cuda, tokenizer, grow_vocab, dtype=torch.float32)


def load_reference(base, section, cuda, tokenizer, grow_vocab):
    """The frozen starting model that dpo and kto compare the policy with, when the method trains the
    weights themselves (full; adapter methods disable the adapter instead): loaded as the base is,
    in the recipe's dtype, without gradients."""
    model = _from_pretrained(base, section, cuda, tokenizer, grow_vocab)
    model.requires_grad_(False)
    return model.eval()


def load_lora(base, section, cuda, tokenizer, grow_vocab):
    from peft import get_peft_model

    model = _from_pretrained(base, section, cuda, tokenizer, grow_vocab)
    lora = section["train"]["lora"]
    return get_peft_model(model, lora_config(lora, check_target_modules(model, lora["target_modules"])))


def compute_dtype_4bit(name: str, cuda: bool) -> Any:
    """The dtype 4-bit layers compute in. A CPU without native half-precision matmul (no AVX512-BF16
    or AMX) emulates bf16/fp16 at a fraction of fp32's speed: QLoRA on SmolLM2-135M here took 258 s a
    step with bf16 compute and 55 s with fp32, under the same load. There it computes in fp32."""
    import torch

    compute = getattr(torch, name)
    if cuda or compute == torch.float32:
        return compute
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - a build without oneDNN has no native path either
        native = False
    if compute == torch.bfloat16 and native:
        return compute
    log.info("train.quantization.compute_dtype %s: this CPU has no native %s matmul, so the 4-bit layers "
             "compute in float32 (several times faster here; the weights stay 4-bit)", name, name)
    return torch.float32


def load_4bit(base, section, cuda, tokenizer, grow_vocab):
    """The base as qlora trains against it: bitsandbytes 4-bit with the recipe's quantization settings."""
    from transformers import BitsAndBytesConfig

    q = section["train"]["quantization"]
    compute = compute_dtype_4bit(q["compute_dtype"], cuda)
    return _from_pretrained(
        base, section, cuda, tokenizer, grow_vocab, dtype=compute,
        device_map={"": local_rank() if cuda else "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q["quant_type"],
                                               bnb_4bit_use_double_quant=q["double_quant"],
                                               bnb_4bit_compute_dtype=compute))


def load_qlora(base, section, cuda, tokenizer, grow_vocab):
    from peft import get_peft_model, prepare_model_for_kbit_training

    train = section["train"]
    model = load_4bit(base, section, cuda, tokenizer, grow_vocab)
    targets = check_target_modules(model, train["lora"]["target_modules"])
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(train["args"]["gradient_checkpointing"]),
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, lora_config(train["lora"], targets))


def load_unsloth(base, section, cuda, tokenizer, grow_vocab):
    # Imported only here, after the CUDA check: unsloth raises at import time without a GPU.
    import torch
    from unsloth import FastLanguageModel

    train = section["train"]
    lora, args, q = train["lora"], train["args"], train["quantization"]
    if q["quant_type"] != "nf4" or not q["double_quant"]:
        raise TunesmithError("train.method 'unsloth' loads nf4 with double quantisation; for quant_type "
                             f"{q['quant_type']!r} / double_quant {q['double_quant']} use method 'qlora'")
    # unsloth's dtype is the compute dtype of its 4-bit layers and of everything left unquantised.
    dtype = getattr(torch, q["compute_dtype"]) if q["compute_dtype"] != "float32" \
        else resolve_dtype(section["model"]["dtype"], cuda)
    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(base), max_seq_length=args["max_length"], dtype=dtype, load_in_4bit=True,
        trust_remote_code=bool(section["model"]["trust_remote_code"]))
    if grow_vocab:  # a pad token was added: without its embedding row the first padded batch asserts on device
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    targets = lora["target_modules"]
    targets = linear_module_names(model) if targets == "all-linear" else check_target_modules(model, targets)
    model = FastLanguageModel.get_peft_model(
        model, r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], bias=lora["bias"],
        target_modules=targets, use_dora=lora["use_dora"], random_state=args["seed"], max_seq_length=args["max_length"],
        # The recipe decides, as for every method (measured on an H100: 606 -> 932 tokens/s without it).
        use_gradient_checkpointing="unsloth" if args["gradient_checkpointing"] else False)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


METHODS: dict[str, Method] = {
    "full": Method("full", needs_cuda=False, cuda_why="", default_gpus=0, adapter=False, default_optim="adamw_torch",
                   own_gradient_checkpointing=False, load=load_full),
    "lora": Method("lora", needs_cuda=False, cuda_why="", default_gpus=0, adapter=True, default_optim="adamw_torch",
                   own_gradient_checkpointing=False, load=load_lora),
    # bitsandbytes 0.50 runs nf4 layers and its 8-bit optimisers on CPU too (slower than LoRA there).
    "qlora": Method("qlora", needs_cuda=False, cuda_why="", default_gpus=1,
                    adapter=True, default_optim="paged_adamw_8bit", own_gradient_checkpointing=False,
                    load=load_qlora, trained_base=load_4bit),
    "unsloth": Method("unsloth", needs_cuda=True, cuda_why="unsloth cannot even be imported without a CUDA GPU",
                      default_gpus=1,
                      adapter=True, default_optim="adamw_torch", own_gradient_checkpointing=True,
                      load=load_unsloth, import_first="unsloth"),
}


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise TunesmithError(f"train.method '{name}' is unknown; known: {', '.join(METHODS)}") from None


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())



def require_device(method: str) -> bool:
    """Return whether CUDA is here; stop at once when the method cannot run without it.

    Decided from torch, never from the scheduler's gpu resource (Snakemake scales that down silently)."""
    entry = get(method)
    cuda = cuda_available()
    if entry.needs_cuda and not cuda:
        raise EnvironmentNotSupported(
            f"train.method '{method}' needs a CUDA GPU and torch sees none ({entry.cuda_why}). "
            f"On this machine use 'method: lora' (same adapter, 16/32-bit base), "
            f"or run the train rule on a GPU node (--resources gpu=1 / the slurm profile).")
    return cuda
