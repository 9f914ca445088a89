"""Chat templates and the train/eval files trl's SFTTrainer reads.

Rows become conversational prompt/completion pairs::

    {"id": 17, "prompt": [{"role": "system", ...}?, {"role": "user", ...}, ...earlier turns],
     "completion": [{"role": "assistant", "content": "..."}]}

trl renders prompt and prompt+completion with the chat template and puts the loss on the
completion only. Eval rows also carry "answer" (the reference assistant text).

Templates: ``model`` (the tokenizer's own), ``chatml``, ``llama-3``, ``alpaca`` (files in
tunesmith/templates/) or ``custom`` (jinja text or a .jinja path). Every template must end each
assistant turn with the tokenizer's EOS (or an end-of-turn token listed in the model's
generation_config.json), or the tuned model never learns to stop; :func:`check_end_of_turn` enforces that.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd

from tunesmith.errors import DataError

NAMED = ("chatml", "llama-3", "alpaca")
COMPLETION_START = "⟦completion: the loss falls on what follows⟧"
COMPLETION_END = "⟦end of completion⟧"
_PROBE = "tunesmith-probe-answer-7f3a"


def named_template(name: str) -> str:
    if name not in NAMED:
        raise DataError(f"format.template '{name}' is not one of: model, custom, {', '.join(NAMED)}")
    return (importlib.resources.files("tunesmith") / "templates" / f"{name}.jinja").read_text(encoding="utf-8")


def resolve_template(section: dict[str, Any], tokenizer: Any, tokenizer_dir: str | None = None) -> str:
    """The jinja text actually used for format.template."""
    name = section["template"]
    if name == "model":
        text = getattr(tokenizer, "chat_template", None)
        if isinstance(text, dict):  # several named templates: the default one renders chats
            text = text.get("default")
        if not text:
            raise DataError(f"format.template is 'model', but the tokenizer in {tokenizer_dir or 'the model folder'} "
                            f"has no chat template; choose chatml, llama-3, alpaca or custom")
        return text
    if name == "custom":
        custom = section["custom_template"]
        if not custom:
            raise DataError("format.template is 'custom' but format.custom_template is empty")
        if custom.strip().endswith(".jinja") and "\n" not in custom.strip():
            path = Path(custom.strip())
            if not path.is_file():
                raise DataError(f"format.custom_template: file {path} not found")
            return path.read_text(encoding="utf-8")
        return custom
    return named_template(name)


def render(tokenizer: Any, template: str, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # noqa: BLE001 - jinja errors: name the template, not jinja's internals
        raise DataError(f"the chat template failed to render a conversation: {type(exc).__name__}: {exc}") from None


def end_of_turn_tokens(tokenizer: Any, model_dir: str | Path | None = None) -> list[str]:
    """EOS plus any generation_config.json eos ids: the tokens generation stops at (what train checks)."""
    found = [tokenizer.eos_token] if tokenizer.eos_token else []
    config = Path(model_dir) / "generation_config.json" if model_dir else None
    if config is not None and config.is_file():
        import json

        eos = json.loads(config.read_text()).get("eos_token_id")
        for token_id in ([eos] if isinstance(eos, int) else eos or []):
            token = tokenizer.convert_ids_to_tokens(int(token_id))
            if token and token not in found:
                found.append(token)
    return found


def check_end_of_turn(tokenizer: Any, template: str, label: str, model_dir: str | Path | None = None) -> str:
    """Each assistant turn must be followed by a token generation stops at; returns the one used."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE},
             {"role": "user", "content": "again"}, {"role": "assistant", "content": _PROBE}]
    text = render(tokenizer, template, probe)
    pieces = text.split(_PROBE)
    if len(pieces) != 3:
        raise DataError(f"chat template '{label}' does not render each assistant message once")
    specials = end_of_turn_tokens(tokenizer, model_dir)
    for after in pieces[1:]:
        used = next((t for t in specials if after.startswith(t)), None)
        if used is None:
            raise DataError(
                f"chat template '{label}' does not end an assistant turn with a token generation stops at "
                f"(after the answer comes {after[:30]!r}; this model stops at {specials}). A model "
                f"trained on it would not learn to stop. Use template: model or a template that emits "
                f"{tokenizer.eos_token!r} (e.g. chatml for ChatML models, alpaca for any).")
    return next(t for t in specials if pieces[1].startswith(t))


# ---------------------------------------------------------------- rows -> conversations

def conversation(row: dict[str, Any], system_prompt: str | None) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(prompt messages, completion messages) for one canonical row."""
    system = system_prompt if system_prompt is not None else (row.get("system") or "")
    msgs = list(row.get("messages") or [])
    if msgs:
        turns = [dict(m) for m in msgs if m["role"] != "system"]
    else:
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    prompt = ([{"role": "system", "content": system}] if system else []) + turns[:-1]
    return prompt, [turns[-1]]


def split_positions(n: int, fraction: float, max_rows: int, seed: int) -> np.ndarray:
    """Held-out positions: a seeded permutation's first round(n * fraction) rows, capped at max_rows."""
    if fraction <= 0 or n < 2:
        return np.zeros(0, dtype=int)
    n_eval = min(max_rows, max(1, int(round(n * fraction))), n - 1)
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n)[:n_eval])


def held_positions(frame: pd.DataFrame, section: dict[str, Any]) -> set[int]:
    """Positions of the held-out rows. A `split` column (the decontaminate stage fixes the split before
    it drops leaks) wins; a mixture (a `source` column) is split per source, eval_fraction of each
    capped at eval_max_rows each, so that every source is scored and none is up-sampled first."""
    if "split" in frame.columns:
        return {pos for pos, s in enumerate(frame["split"]) if s == "eval"}
    args = (section["eval_fraction"], section["eval_max_rows"], section["seed"])
    if "source" not in frame.columns:
        return set(split_positions(len(frame), *args).tolist())
    held: set[int] = set()
    for name in dict.fromkeys(frame["source"]):
        positions = np.flatnonzero((frame["source"] == name).to_numpy())
        held.update(positions[split_positions(len(positions), *args)].tolist())
    return held


def build(frame: pd.DataFrame, section: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """train rows, eval rows (prompt/completion; eval rows with 'answer'; a mixture's rows name their
    source)."""
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for item, held in items(frame.to_dict("records"), section, held_positions(frame, section)):
        (evals if held else train).append(item)
    return train, evals


def items(records: Iterable[dict[str, Any]], section: dict[str, Any], held: set[int],
          offset: int = 0) -> Iterator[tuple[dict[str, Any], bool]]:
    """(row as build() writes it, whether it is held out) for a batch of canonical rows as dicts
    (a frame's records, or an arrow batch's to_pylist(), several times cheaper) whose first row is
    at position `offset` of the whole file (held: held_positions() of the whole file)."""
    system_prompt = section["system_prompt"]
    for pos, row in enumerate(records, start=offset):
        prompt, completion = conversation(row, system_prompt)
        item = {"id": int(row["id"]), "prompt": prompt, "completion": completion}
        if row.get("source"):
            item["source"] = str(row["source"])
        if pos in held:
            item["answer"] = completion[-1]["content"]
        yield item, pos in held


def mix(train: list[dict[str, Any]], weights: dict[str, float], seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train rows resampled so each source makes up its weight's share of as many rows as there are:
    a source over its share is sampled down, one under it is repeated (seeded). Only train rows:
    the held-out rows are split off before, so none is ever repeated into train."""
    rng = np.random.default_rng(seed)
    total_w = sum(weights.values())
    groups: dict[str, list[dict[str, Any]]] = {name: [] for name in weights}
    for row in train:
        groups.setdefault(row.get("source", ""), []).append(row)
    n = len(train)
    out: list[dict[str, Any]] = []
    rows: dict[str, dict[str, int]] = {}
    for name, w in weights.items():
        have = groups[name]
        want = int(round(n * w / total_w))
        if not have:
            rows[name] = {"available": 0, "train": 0, "repeated": 0}
            continue
        if want <= len(have):
            picked = [have[i] for i in np.sort(rng.choice(len(have), want, replace=False))]
        else:
            picked = have + [have[i] for i in rng.choice(len(have), want - len(have), replace=True)]
        rows[name] = {"available": len(have), "train": len(picked), "repeated": max(0, want - len(have))}
        out.extend(picked)
    out = [out[i] for i in rng.permutation(len(out))]
    report = {"requested": {k: round(w / total_w, 4) for k, w in weights.items()},
              "obtained": {k: round(r["train"] / max(1, len(out)), 4) for k, r in rows.items()}, "rows": rows}
    return out, report


def _check_messages(value: Any, path: str, line: int, field: str, roles: tuple[str, ...]) -> None:
    if not isinstance(value, list) or not value:
        raise DataError(f"{path}, row {line}, field '{field}': expected a non-empty list of messages")
    for j, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or msg.get("role") not in roles:
            raise DataError(f"{path}, row {line}, field '{field}[{j}]': expected {{'role': one of {list(roles)}, "
                            f"'content': text}}, got {str(msg)[:120]!r}")


def read_split(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Read train.jsonl / eval.jsonl as build() writes them, checked row by row: the one reader
    of these files (train, merge, evaluate and quantize all call it). Eval rows keep 'answer'."""
    path = str(path)
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    rows: list[dict[str, Any]] = []
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
            if "answer" in row and not isinstance(row["answer"], str):
                raise DataError(f"{path}, row {line_no}, field 'answer': expected text")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def preview(tokenizer: Any, template: str, rows: list[dict[str, Any]], n: int) -> str:
    """The first n examples exactly as the model sees them, the completion fenced off."""
    out = []
    for i, row in enumerate(rows[:n], start=1):
        prompt_text = render(tokenizer, template, row["prompt"], add_generation_prompt=True)
        full = render(tokenizer, template, row["prompt"] + row["completion"])
        if full.startswith(prompt_text):
            body = f"{prompt_text}{COMPLETION_START}{full[len(prompt_text):]}{COMPLETION_END}"
        else:
            # The template renders the prompt differently once an answer follows: show both.
            body = (f"[prompt with generation prompt]\n{prompt_text}\n[full conversation]\n{full}\n"
                    f"(warning: the full text does not start with the prompt text)")
        n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        n_full = len(tokenizer(full, add_special_tokens=False)["input_ids"])
        out.append(f"===== example {i} (id {row['id']}): {n_prompt} prompt tokens, "
                   f"{n_full - n_prompt} completion tokens =====\n{body}\n")
    return "\n".join(out)
