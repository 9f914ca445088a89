"""Tokenising prompt/completion conversations exactly as they are trained, and the template/EOS
contract gate that runs on those very tokens before the first optimizer step.

Why our own tokenisation rather than trl's: trl silently drops examples that truncation leaves
fully masked and, with packing, loses the example index. Tokenising here (the same way trl does:
prompt rendered with the generation prompt, completion = where prompt and prompt+completion
diverge) lets the gate name the example, and trl trains on exactly the ids the gate checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tunesmith.errors import TunesmithError

IGNORE = -100


class ContractError(TunesmithError):
    """An example violates the template/EOS contract (the 'never stops generating' family of bugs)."""


@dataclass
class Violation:
    index: int
    reason: str

    def __str__(self) -> str:
        return f"example {self.index}: {self.reason}"


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _ids(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


def tokenize_example(tokenizer: Any, prompt: list[dict[str, Any]], completion: list[dict[str, Any]],
                     max_length: int | None) -> dict[str, Any]:
    """input_ids + labels (prompt masked with -100), truncated from the end like trl's keep_start."""
    prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
    full_ids = _ids(tokenizer, prompt + completion)
    start = common_prefix_length(prompt_ids, full_ids)
    labels = [IGNORE] * start + full_ids[start:]
    truncated = max_length is not None and len(full_ids) > max_length
    if truncated:
        full_ids, labels = full_ids[:max_length], labels[:max_length]
    return {"input_ids": full_ids, "labels": labels, "truncated": truncated}


def tokenize_rows(tokenizer: Any, rows: Iterable[dict[str, Any]], max_length: int | None) -> list[dict[str, Any]]:
    return [tokenize_example(tokenizer, r["prompt"], r["completion"], max_length) for r in rows]


def end_of_turn_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(i) for i in eos)
    return ids


def _is_blank(tokenizer: Any, token_id: int) -> bool:
    return tokenizer.decode([token_id]).strip() == ""


def _collated_labels(collator: Callable[[list[dict[str, Any]]], Any], examples: list[dict[str, Any]]) -> list[list[int]]:
    """Labels the collator produces for each example, cut back to the example's own length."""
    batch = collator([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    labels = batch["labels"].tolist()
    return [row[: len(e["input_ids"])] for row, e in zip(labels, examples)]


def check_example(index: int, example: dict[str, Any], labels: list[int], tokenizer: Any,
                  eos_ids: set[int], max_length: int | None) -> Violation | None:
    ids = example["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        return Violation(index, f"starts with a double BOS {tokenizer.bos_token!r}: the chat template writes "
                                f"BOS and the tokenizer adds another")
    supervised = [i for i, lab in enumerate(labels) if lab != IGNORE]
    if not supervised:
        if example.get("truncated"):
            return Violation(index, f"no supervised token: the prompt alone fills max_length={max_length}")
        return Violation(index, "no supervised token: every label is -100 (the chat template renders nothing "
                                "for the assistant turn, or the mask hides the whole response)")
    # The response must end with a supervised end-of-turn token; ChatML-style templates put a
    # newline after it, so trailing blank tokens are skipped.
    last = supervised[-1]
    while last > supervised[0] and _is_blank(tokenizer, ids[last]) and ids[last] not in eos_ids:
        last -= 1
    if ids[last] in eos_ids and labels[last] != IGNORE:
        return None
    eos_name = tokenizer.eos_token
    pad = tokenizer.pad_token_id
    masked_eos = [i for i in range(supervised[0], len(ids)) if ids[i] in eos_ids and labels[i] == IGNORE]
    if masked_eos and pad is not None and pad in eos_ids:
        return Violation(index, f"pad token equals EOS {eos_name!r} and the collator masks it out of the labels, "
                                f"so the model never learns to stop; use a distinct pad token")
    if example.get("truncated"):
        return Violation(index, f"response cut at max_length={max_length} before its end-of-turn token "
                                f"{eos_name!r}; raise train.args.max_length or filter long rows")
    if masked_eos:
        return Violation(index, f"end-of-turn token {eos_name!r} is in the response but masked (-100) in the labels")
    return Violation(index, f"response does not end with a supervised end-of-turn token {eos_name!r} "
                            f"(last supervised token: {tokenizer.decode([ids[supervised[-1]]])!r}); "
                            f"the chat template must close the assistant turn with EOS")


def _split_eos_ids(rows: list[Any], tokenizer: Any, generation_config: Any, name: str) -> set[int]:
    """What both gates need before looking at a row: something to train on, and an EOS to end it."""
    if not rows:
        raise ContractError(f"{name} split is empty: nothing to train on")
    eos_ids = end_of_turn_ids(tokenizer, generation_config)
    if not eos_ids:
        raise ContractError("the tokenizer has no EOS token: generation could never stop")
    return eos_ids


def gate(examples: list[dict[str, Any]], tokenizer: Any, *, collator: Callable | None = None,
         generation_config: Any = None, max_length: int | None = None, batch_size: int = 8,
         name: str = "train") -> None:
    """Raise ContractError naming the first bad examples (index + one-line reason); None when all pass.

    With a collator, labels are taken from its output, batched so that padding happens: that is
    where a pad token equal to EOS masks EOS away."""
    eos_ids = _split_eos_ids(examples, tokenizer, generation_config, name)
    bad: list[Violation] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        labels = _collated_labels(collator, chunk) if collator is not None else [e["labels"] for e in chunk]
        for offset, (example, lab) in enumerate(zip(chunk, labels)):
            violation = check_example(start + offset, example, lab, tokenizer, eos_ids, max_length)
            if violation:
                bad.append(violation)
    if bad:
        shown = "\n".join(f"  {v}" for v in bad[:5])
        more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ContractError(f"template/EOS contract failed for {len(bad)} of {len(examples)} {name} "
                            f"examples (indices are rows of {name}.jsonl, from 0):\n{shown}{more}")


# ---------------------------------------------------------------- pairs (dpo, kto)

COMPLETION_FIELDS = ("chosen", "rejected", "completion")


@dataclass
class PairViolation:
    row_id: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"row id {self.row_id}, {self.field}: {self.reason}"


def _show(tokenizer: Any, ids: Sequence[int]) -> str:
    return repr(tokenizer.decode(list(ids[:12])))


def tokenize_completion(tokenizer: Any, prompt: list[dict[str, Any]],
                        completion: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(prompt ids with the generation prompt, prompt + completion ids), rendered as trl's
    DPOTrainer and KTOTrainer render them (tokenize=True chat templates, no extra special tokens)."""
    return _ids(tokenizer, prompt, add_generation_prompt=True), _ids(tokenizer, prompt + completion)


def _end_of_completion(tokenizer: Any, full: list[int], start: int, eos_ids: set[int]) -> int:
    """Index of the completion's last token, trailing blank tokens (ChatML's newline) skipped."""
    last = len(full) - 1
    while last > start and _is_blank(tokenizer, full[last]) and full[last] not in eos_ids:
        last -= 1
    return last


def check_completion(row_id: str, field: str, prompt_ids: list[int], full: list[int], tokenizer: Any,
                     eos_ids: set[int], max_length: int | None) -> tuple[PairViolation | None, int | None]:
    """One prompt + completion sequence: (violation or None, position of its end-of-turn token)."""
    bos = tokenizer.bos_token_id
    if bos is not None and len(full) >= 2 and full[0] == bos and full[1] == bos:
        return PairViolation(row_id, field, f"starts with a double BOS {tokenizer.bos_token!r}: the chat template "
                                            f"writes BOS and the tokenizer adds another"), None
    n = len(prompt_ids)
    if full[:n] != prompt_ids:
        k = common_prefix_length(prompt_ids, full)
        if tokenizer.decode(full).startswith(tokenizer.decode(prompt_ids)):
            why = (f"the same text, tokenised differently: the {field} text merges with the prompt's last token "
                   f"(a completion that starts with whitespace does this; strip it)")
        else:
            why = "the chat template must render the prompt the same with and without the answer"
        return PairViolation(row_id, field, f"the prompt renders differently at the start of the {field} sequence: "
                                            f"from token {k} the prompt alone reads {_show(tokenizer, prompt_ids[k:])} "
                                            f"but prompt + {field} reads {_show(tokenizer, full[k:])}; {why}"), None
    if max_length is not None and n >= max_length:
        return PairViolation(row_id, field, f"the prompt alone ({n} tokens) fills max_length={max_length}: no "
                                            f"{field} token would be trained (trl drops such rows silently)"), None
    if len(full) == n:
        return PairViolation(row_id, field, "no completion token: the chat template renders nothing for the "
                                            "assistant turn"), None
    eos_name = tokenizer.eos_token
    last = _end_of_completion(tokenizer, full, n, eos_ids)
    if full[last] not in eos_ids:
        return PairViolation(row_id, field, f"the completion does not end with the end-of-turn token {eos_name!r} "
                                            f"(it ends with {_show(tokenizer, full[last:])}); the chat template must "
                                            f"close the assistant turn with EOS"), None
    if max_length is not None and last >= max_length:
        return PairViolation(row_id, field, f"cut at max_length={max_length} before its end-of-turn token "
                                            f"{eos_name!r} ({len(full)} tokens); raise train.args.max_length or "
                                            f"filter long pairs"), None
    return None, last


def pair_gate(rows: list[dict[str, Any]], tokenizer: Any, *, collator: Callable | None = None,
              generation_config: Any = None, max_length: int | None = None, batch_size: int = 8,
              name: str = "train") -> None:
    """The pair contract, checked before step one on canonical rows (pairs or KTO's unpaired rows):
    the prompt renders identically as the prefix of every completion's sequence (so chosen and
    rejected share it), each completion ends in an end-of-turn token that is supervised
    (completion_mask 1 in the trainer's own collator, within max_length), and no double BOS.
    Raises ContractError naming the first bad rows by id; returns None when all pass."""
    eos_ids = _split_eos_ids(rows, tokenizer, generation_config, name)
    bad: list[PairViolation] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        checked = []  # (row position in chunk, field, end-of-turn position, ids)
        examples = []
        for pos, row in enumerate(chunk):
            fields = [f for f in COMPLETION_FIELDS if f in row]
            example: dict[str, Any] = {}
            row_ok = True
            for field in fields:
                prompt_ids, full = tokenize_completion(tokenizer, row["prompt"], row[field])
                violation, eos_at = check_completion(str(row["id"]), field, prompt_ids, full, tokenizer, eos_ids,
                                                     max_length)
                if violation is not None:
                    bad.append(violation)
                    row_ok = False
                    continue
                example["prompt_ids"] = prompt_ids
                example["completion_ids" if field == "completion" else f"{field}_ids"] = full[len(prompt_ids):]
                checked.append((pos, field, eos_at))
            if "label" in row:
                example["label"] = bool(row["label"])
            examples.append(example if row_ok else None)
        if collator is None or not checked:
            continue
        good = [i for i, e in enumerate(examples) if e is not None]
        if not good:
            continue
        masks = collator([examples[i] for i in good])["completion_mask"].tolist()
        where = {pos: k for k, pos in enumerate(good)}
        for pos, field, eos_at in checked:
            if pos not in where:
                continue
            k = where[pos]
            mask = masks[len(good) + k] if field == "rejected" else masks[k]  # DPO batches chosen, then rejected
            if eos_at >= len(mask) or not mask[eos_at]:
                bad.append(PairViolation(str(chunk[pos]["id"]), field,
                                         f"the end-of-turn token {tokenizer.eos_token!r} is not supervised: the "
                                         f"trainer's collator masks it out of the completion"))
    if bad:
        shown = "\n".join(f"  {v}" for v in bad[:5])
        more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ContractError(f"pair contract failed for {len(bad)} completion(s) of {len(rows)} {name} rows:\n"
                            f"{shown}{more}")


def prompt_gate(rows: list[dict[str, Any]], tokenizer: Any, *, name: str = "train") -> None:
    """GRPO's prompts: they render with the generation prompt and start with at most one BOS."""
    bos = tokenizer.bos_token_id
    bad = []
    for row in rows:
        ids = _ids(tokenizer, row["prompt"], add_generation_prompt=True)
        if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            bad.append(f"  row id {row['id']}: starts with a double BOS {tokenizer.bos_token!r}")
    if bad:
        raise ContractError(f"prompt contract failed for {len(bad)} of {len(rows)} {name} rows:\n" + "\n".join(bad[:5]))


# Tokens that models ship for padding; used before falling back to unk or adding a new one.
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|padding|>")



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
