"""Batches that fill the card: the largest micro-batch that fits (train.args.auto_batch), gradient
accumulation that keeps the recipe's effective batch, length-grouped batches for padded runs, and
the share of padding in the batches a run really trained on.

transformers' own auto_find_batch_size only halves a batch after an out-of-memory error in the
middle of training and leaves the accumulation alone, so the effective batch shrinks with it; here
the probe runs before step one, on the run's longest rows through the trainer's own collator.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from tunesmith.errors import TunesmithError

log = logging.getLogger("tunesmith.train")


@dataclass
class Search:
    micro_batch: int
    gradient_accumulation_steps: int
    tried: list[tuple[int, bool]] = field(default_factory=list)  # (micro-batch, fitted)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def find_micro_batch(fits: Callable[[int], None], effective: int, *, start: int = 1,
                     ceiling: int | None = None) -> Search:
    """The largest divisor of `effective` (the recipe's per-device batch x accumulation) for which
    fits(n) returns without torch.OutOfMemoryError; accumulation makes up the rest, so the
    effective batch stays exactly the recipe's. The search starts at `start` (the recipe's own
    micro-batch: each new size is a new shape, and a compiled kernel such as flex attention
    compiles again for it), gallops up while sizes fit, then bisects between the last fit and the
    first failure; no size is probed twice."""
    import torch

    candidates = [d for d in divisors(effective) if ceiling is None or d <= ceiling]
    tried: list[tuple[int, bool]] = []

    def ok(i: int) -> bool:
        n = candidates[i]
        try:
            fits(n)
        except torch.OutOfMemoryError:
            tried.append((n, False))
            log.info("auto_batch: micro-batch %d does not fit", n)
            _release()
            return False
        tried.append((n, True))
        _release()
        return True

    first = max(i for i, c in enumerate(candidates) if c <= max(1, start))
    if ok(first):
        good, bad, step = first, len(candidates), 1
        while good + step < bad:
            if ok(good + step):
                good += step
                step *= 2
            else:
                bad = good + step
    else:
        good, bad = -1, first
    while bad - good > 1:
        mid = (good + bad) // 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    if good < 0:
        raise TunesmithError(f"train.args.auto_batch: even a micro-batch of {candidates[0]} runs out of memory; lower "
                             f"train.args.max_length, use gradient_checkpointing, or a smaller method (qlora)")
    micro = candidates[good]
    return Search(micro, effective // micro, tried)


def _release() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def probe(trainer: Any, optimizer_bytes: int = 0) -> Callable[[int], None]:
    """fits(n) for find_micro_batch: one forward and backward of the n longest training rows,
    collated as training collates them, on the trainer's model. The optimizer does not exist yet,
    so its state (optimizer_bytes, e.g. AdamW's two fp32 moments of the trainable weights) is held
    as a block of memory during the probe: a micro-batch that fits only without it would fail at
    the first step."""
    import torch

    model = trainer.model
    dataset = trainer.train_dataset
    lengths = [len(ids) for ids in dataset["input_ids"]]
    longest = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    device = next(p.device for p in model.parameters())
    # What train() switches on only when it starts, and which changes the memory a step takes:
    # mixed precision (accelerate's autocast around the forward) and gradient checkpointing.
    half = torch.bfloat16 if trainer.args.bf16 else torch.float16 if trainer.args.fp16 else None
    if trainer.args.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)

    def fits(n: int) -> None:
        rows = [dataset[i] for i in longest[:n]]
        if len(rows) < n:  # fewer rows than the micro-batch: repeat the longest, as a full batch would be
            rows = (rows * (n // max(1, len(rows)) + 1))[:n]
        batch = trainer.data_collator([{k: r[k] for k in r if k in ("input_ids", "labels", "seq_lengths")}
                                       for r in rows])
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        held = torch.empty(optimizer_bytes, dtype=torch.uint8, device=device) if optimizer_bytes and device.type == "cuda" else None
        try:
            with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
                loss = model(**batch, use_cache=False).loss
            loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
            del held
    return fits


def optimizer_state_bytes(model: Any, optim: str) -> int:
    """Bytes the optimizer's state will take: two moments per trainable weight (fp32, or 1 byte
    each for the 8-bit optimisers). The gradients are allocated by the probe's own backward."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable * (2 if "8bit" in optim else 8)


# ---------------------------------------------------------------- padding

class PaddingCount:
    """Wraps a collator and counts the tokens of the rows it gets against the tokens of the
    batches it returns: padding share = 1 - real / batch tokens, over the batches a run built."""

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.collator = collator
        self.real = 0
        self.total = 0
        self.batches = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        if features and "input_ids" in features[0] and hasattr(batch.get("input_ids"), "numel"):
            self.real += sum(len(f["input_ids"]) for f in features)
            self.total += int(batch["input_ids"].numel())
            self.batches += 1
        return batch

    def __getattr__(self, name: str) -> Any:  # the trainer reads collator attributes (padding_free, ...)
        return getattr(self.__dict__["collator"], name)

    def figures(self) -> dict[str, Any]:
        share = 1.0 - self.real / self.total if self.total else None
        return {"padding_share": round(share, 4) if share is not None else None, "batch_tokens": self.total,
                "real_tokens": self.real, "batches_counted": self.batches}


def sampler_kwargs(config_cls: Any, group: bool) -> dict[str, Any]:
    """Length-grouped sampling under the name this transformers has: train_sampling_strategy
    (5.2x) or group_by_length (older). Nothing when not grouping: the config class keeps its own
    default (trl's KTOConfig needs 'sequential' for its KL pairs)."""
    import dataclasses

    if not group:
        return {}
    names = {f.name for f in dataclasses.fields(config_cls)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length"}
    if "group_by_length" in names:
        return {"group_by_length": True}
    log.warning("this transformers has no length-grouped sampler; batches are drawn at random")
    return {}


class EpochSeeded:
    """transformers builds its LengthGroupedSampler without a generator, so the grouped order comes
    from the global RNG as it stands when an epoch starts, which a resumed run does not reproduce
    (tests/test_train_ddp.py saw the losses part after the resume). Here each epoch's order is a
    function of (seed, epoch) alone; the trainer calls set_epoch at every epoch start."""

    def __init__(self, sampler: Any, seed: int) -> None:
        self.sampler, self.seed, self.epoch = sampler, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        import torch

        self.sampler.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(self.sampler)


def seeded(sampler: Any, seed: int) -> Any:
    """The trainer's train sampler, length-grouped ones made reproducible (EpochSeeded)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    return EpochSeeded(sampler, seed) if isinstance(sampler, LengthGroupedSampler) else sampler
