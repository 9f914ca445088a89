"""Which attention kernel a training run uses (model.attn_implementation), and a check that packed
documents cannot see each other.

How transformers 5 treats a padding-free packed row (one row, position ids restarting at each
document, no attention mask; trl's `packing` with the bfd strategy): its mask builder
(masking_utils.find_packed_sequence_indices) reads the restarts from position_ids, but only when
no attention mask and no cache are passed, and then
- flash_attention_2: no mask at all; the kernel runs variable-length over the documents (the
  collator's cu_seq_lens), so the cost is that of the documents alone;
- flex_attention: a block-sparse document mask (BlockMask), also linear in the documents;
- sdpa and eager: a dense bool mask of rows x L x L over the whole packed row: correct, but SDPA
  then cannot use its flash kernel and the mask alone is L^2 (16k tokens: 256 MB a row).
Models that build their masks themselves ignore the restarts and let documents attend to each
other: OPT (sdpa and eager) and BLOOM (eager) in transformers 5.23, found by check_isolation
below; any model whose attention an outside library replaces may too. transformers' own guide
("Padding-free training") adds linear-attention and convolution models (Qwen3-Next, Qwen3.5),
which need the collator's boundary kwargs (trl's padding-free collator sends cu_seq_lens and
seq_idx, so they may pass: the check decides). So the rule is not
trusted from a table: a packed run is checked on its own model before step one.

Measured here (CPU, tiny Llama, tests/test_attention.py): packed == per-document loss to 1e-5 for
sdpa, eager and flex_attention (forward); flex_attention's first call compiles for about 40 s on 2
cores, and it cannot train on CPU (torch 2.13: "FlexAttention does not support backward on CPU"),
so on CPU auto packs with sdpa's dense mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tunesmith.errors import TunesmithError

log = logging.getLogger("tunesmith.train")

IMPLEMENTATIONS = ("auto", "sdpa", "flex_attention", "flash_attention_2", "eager")
# Kernels whose cost follows the documents of a packed row, not the row's square.
VARLEN = ("flash_attention_2", "flex_attention")
KEYS = "model.attn_implementation and train.args.packing"


@dataclass(frozen=True)
class Choice:
    implementation: str
    reason: str
    static_row: bool = False  # pad each packed micro-batch to one length: flex compiles once per shape


def flash_attn_installed() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return bool(is_flash_attn_2_available())


def flex_available() -> bool:
    from transformers.utils import is_torch_flex_attn_available

    return bool(is_torch_flex_attn_available())


def transformers_reads_packed_positions() -> bool:
    """transformers builds document masks from restarting position ids (5.x does; 4.x before ~4.56 did
    not, and then sdpa/eager/flex let packed documents attend to each other)."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


def choose(requested: str, *, packing: bool, cuda: bool, method: str = "lora") -> Choice:
    """The kernel for this run. auto: padded batches -> sdpa (its flash/memory-efficient kernels
    take a padding mask); packed -> flash_attention_2 where flash-attn is installed on CUDA, else
    flex_attention with document masks; never sdpa's dense mask over a packed row. An explicit
    choice is honoured; one that would let packed documents attend to each other is refused."""
    if requested not in IMPLEMENTATIONS:
        raise TunesmithError(f"model.attn_implementation '{requested}' is unknown; known: {', '.join(IMPLEMENTATIONS)}")
    if method == "unsloth":
        # unsloth patches the attention forward itself and ignores the model's attn_implementation.
        if requested not in ("auto",):
            log.warning("model.attn_implementation %s is ignored by method unsloth (it runs its own attention)",
                        requested)
        return Choice("unsloth", "method unsloth runs its own attention kernels")
    if requested == "flash_attention_2":
        if not cuda:
            raise TunesmithError("model.attn_implementation flash_attention_2 needs CUDA; on CPU use auto "
                                 "(sdpa, or flex_attention when train.args.packing is on)")
        if not flash_attn_installed():
            raise TunesmithError("model.attn_implementation flash_attention_2 needs the flash-attn package, which "
                                 "is not installed; pip install flash-attn, or use auto (flex_attention for packing)")
    if requested == "flex_attention" and not flex_available():
        raise TunesmithError("model.attn_implementation flex_attention needs torch >= 2.5 with flex attention")
    if requested == "flex_attention" and not cuda:
        raise TunesmithError("model.attn_implementation flex_attention cannot train on CPU (torch's flex attention "
                             "has no backward there: NotImplementedError in torch 2.13); use auto or sdpa")
    if packing and requested in ("sdpa", "eager", "flex_attention") and not transformers_reads_packed_positions():
        raise TunesmithError(f"{KEYS}: this transformers does not turn restarting position ids into document "
                             f"masks, so with {requested} packed examples would attend to each other; use "
                             f"flash_attention_2, set packing: false, or upgrade transformers to 5.x")
    if requested != "auto":
        why = "set by the recipe"
        if packing and requested in ("sdpa", "eager"):
            log.warning("%s: %s with packing builds a dense mask over each packed row (rows x L x L); auto would "
                        "pick a variable-length kernel", KEYS, requested)
            why += "; packed rows get a dense block-diagonal mask"
        return Choice(requested, why, static_row=packing and requested == "flex_attention")
    if not packing:
        return Choice("sdpa", "padded batches: SDPA takes the padding mask with its fused kernels")
    if not cuda:
        return Choice("sdpa", "packed rows on CPU: flash-attn is CUDA-only and torch's flex attention has no backward "
                      "on CPU, so SDPA with a dense block-diagonal mask")
    if cuda and flash_attn_installed():
        return Choice("flash_attention_2", "packed rows: flash-attn runs variable-length over the documents")
    if flex_available():
        return Choice("flex_attention", "packed rows: flex attention with a block-sparse document mask"
                      + ("" if not cuda else " (flash-attn is not installed)"), static_row=True)
    raise TunesmithError(f"{KEYS}: packing needs a variable-length kernel and neither flash-attn nor torch's flex "
                         f"attention is available; set model.attn_implementation: sdpa to accept a dense mask")


def resolve(section: dict[str, Any], cuda: bool) -> Choice:
    """The Choice for a recipe's model + train sections (resolved). A continued-pretraining section
    has no train part: its full blocks are never packed."""
    train = section.get("train") or {}
    return choose(section["model"].get("attn_implementation", "auto"),
                  packing=bool((train.get("args") or {}).get("packing")), cuda=cuda, method=train.get("method", "full"))


def check_isolation(model: Any, collator: Any, *, length: int = 12, vocab: int | None = None) -> float:
    """Refuse a packed run whose model lets one document see another. Two packed rows, each a first
    document then the same second one, differ only in the first document; with the documents kept
    apart the second document's logits are the same in both. The rows are built by the trainer's
    own collator, so the kernel sees exactly the keys training sends (position ids, cu_seq_lens).
    Returns the largest logit difference seen (0.0 where the kernel keeps them apart)."""
    import torch

    vocab = int(vocab or model.get_input_embeddings().num_embeddings)
    g = torch.Generator().manual_seed(0)
    low, high = min(10, vocab - 2), vocab - 1
    second = torch.randint(low, high, (length,), generator=g).tolist()
    firsts = [torch.randint(low, high, (length,), generator=g).tolist() for _ in range(2)]
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    outs = []
    try:
        with torch.no_grad():
            for first in firsts:
                batch = collator([{"input_ids": first, "labels": first}, {"input_ids": second, "labels": second}])
                batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items() if k != "labels"}
                logits = model(**batch, use_cache=False).logits[0, length:2 * length].float()
                outs.append(logits)
    finally:
        model.train(was_training)
    diff = float((outs[0] - outs[1]).abs().max())
    scale = float(outs[0].abs().max()) or 1.0
    if diff > 1e-3 * scale:
        name = type(getattr(model, "get_base_model", lambda: model)()).__name__
        impl = getattr(getattr(model, "config", None), "_attn_implementation", "?")
        raise TunesmithError(
            f"{KEYS}: packed documents attend to each other with {name} and attention {impl} (a document's "
            f"logits change by {diff:.3g} when the document before it in the packed row changes). This model does "
            f"not read document boundaries from position ids; set train.args.packing: false, or pick a "
            f"model.attn_implementation that keeps documents apart (flash_attention_2 where it is supported)")
    return diff
