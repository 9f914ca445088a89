"""Preference data: the layouts people have, read into tunesmith's canonical rows.

Canonical pair (DPO)::

    {"id": "17", "prompt": [{"role": "user", "content": ...}, ...],     # ends before an assistant turn
     "chosen": [{"role": "assistant", "content": ...}],                # the assistant turn(s) only
     "rejected": [{"role": "assistant", "content": ...}]}

Canonical unpaired row (KTO): ``{"id", "prompt", "completion", "label": true|false}``.

Layouts read (``layout: auto`` tells them apart from the first row):

- ``trl``: prompt/chosen/rejected, each a string or a message list (trl's explicit-prompt
  format; the canonical file is this layout with message lists);
- ``hh``: no prompt; chosen and rejected are whole conversations sharing a prefix (Anthropic HH:
  strings with "\\n\\nHuman:" / "\\n\\nAssistant:" markers, or message lists), split at the last
  assistant turn;
- ``ultrafeedback``: a prompt string and chosen/rejected message lists that repeat the user turn
  and end in the assistant's (HuggingFaceH4/ultrafeedback_binarized), split the same way, the
  prompt checked against the repeated turn;
- ``kto``: prompt/completion/label (label a boolean).

Every bad row raises DataError naming the file, the row ('line N' for JSONL, 'record N'
otherwise) and the field, or with on_bad_rows: skip is dropped and counted by reason.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from tunesmith.data.load import ROLE_MAP, BadRow, Skipped, file_format, message_list, read_hub, read_local, source_kind
from tunesmith.errors import DataError
from tunesmith.fileio import write_jsonl

LAYOUTS = ("auto", "trl", "hh", "ultrafeedback", "kto")
PAIRED = ("trl", "hh", "ultrafeedback")
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


# ---------------------------------------------------------------- fields

def _messages(value: Any, field: str, where: str) -> list[dict[str, str]]:
    out = message_list(value, field, where)
    if not out:
        raise BadRow(where, "bad_messages", field, "expected a non-empty list of messages")
    return out


def _field(record: dict[str, Any], field: str, where: str) -> Any:
    if field not in record or record[field] is None:
        raise BadRow(where, "missing_field", field, f"no '{field}' in this row (columns: {', '.join(map(str, record))})")
    return record[field]


def _prompt(value: Any, field: str, where: str) -> list[dict[str, str]]:
    """A prompt string (one user turn) or message list that does not end with the assistant."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(where, "empty_prompt", field, "the prompt is empty")
        return [{"role": "user", "content": value}]
    msgs = _messages(value, field, where)
    if msgs[-1]["role"] == "assistant":
        raise BadRow(where, "bad_messages", field, "the prompt ends with an assistant turn: the completion "
                                                   "belongs in chosen/rejected (or completion)")
    if not any(m["role"] == "user" for m in msgs):
        raise BadRow(where, "bad_messages", field, "the prompt has no user turn")
    return msgs


def _completion(value: Any, field: str, where: str) -> list[dict[str, str]]:
    """A completion string or a list of assistant messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    msgs = _messages(value, field, where)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            raise BadRow(where, "bad_messages", f"{field}[{i}].role",
                         f"a completion holds assistant turns only, found a {m['role']} turn (whole conversations "
                         f"are layout hh or ultrafeedback)")
    return msgs


def _hh_turns(text: str, field: str, where: str) -> list[dict[str, str]]:
    parts = _HH_MARKER.split(text if text.startswith("\n\n") else "\n\n" + text)
    if len(parts) < 3:
        raise BadRow(where, "bad_conversation", field, "no '\\n\\nHuman:' / '\\n\\nAssistant:' markers in the text")
    if parts[0].strip():
        raise BadRow(where, "bad_conversation", field, f"text before the first Human:/Assistant: marker: "
                                                       f"{parts[0][:60]!r}")
    return [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def _conversation(value: Any, field: str, where: str) -> list[dict[str, str]]:
    return _hh_turns(value, field, where) if isinstance(value, str) else _messages(value, field, where)


def _split_last_assistant(turns: list[dict[str, str]], field: str, where: str):
    if turns[-1]["role"] != "assistant":
        raise BadRow(where, "bad_conversation", field, f"the conversation ends with a {turns[-1]['role']} turn, not "
                                                       f"the assistant's")
    prompt = turns[:-1]
    if not any(m["role"] == "user" for m in prompt):
        raise BadRow(where, "bad_conversation", field, "no user turn before the last assistant turn")
    return prompt, [turns[-1]]


def _first_difference(a: list[dict[str, str]], b: list[dict[str, str]]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"turn {i} ({x['role']}: {x['content'][:50]!r} vs {y['role']}: {y['content'][:50]!r})"
    return f"one has {len(a)} turns before the last assistant turn, the other {len(b)}"


def _row_id(record: dict[str, Any], where: str) -> str:
    for key in ("id", "prompt_id"):
        if isinstance(record.get(key), (str, int)) and not isinstance(record.get(key), bool):
            return str(record[key])
    return where.split()[-1]  # the 1-based line or record number


# ---------------------------------------------------------------- layouts

def pair_trl(record: dict[str, Any], where: str) -> dict[str, Any]:
    return {"id": _row_id(record, where), "prompt": _prompt(_field(record, "prompt", where), "prompt", where),
            "chosen": _completion(_field(record, "chosen", where), "chosen", where),
            "rejected": _completion(_field(record, "rejected", where), "rejected", where)}


def pair_hh(record: dict[str, Any], where: str) -> dict[str, Any]:
    chosen_prompt, chosen = _split_last_assistant(
        _conversation(_field(record, "chosen", where), "chosen", where), "chosen", where)
    rejected_prompt, rejected = _split_last_assistant(
        _conversation(_field(record, "rejected", where), "rejected", where), "rejected", where)
    if chosen_prompt != rejected_prompt:
        raise BadRow(where, "prompt_mismatch", "rejected", f"chosen and rejected do not share the conversation before "
                                                           f"their last assistant turn: {_first_difference(chosen_prompt, rejected_prompt)}")
    return {"id": _row_id(record, where), "prompt": chosen_prompt, "chosen": chosen, "rejected": rejected}


def pair_ultrafeedback(record: dict[str, Any], where: str) -> dict[str, Any]:
    row = pair_hh(record, where)
    prompt = _field(record, "prompt", where)
    if not isinstance(prompt, str):
        raise BadRow(where, "non_string_field", "prompt", f"expected the prompt text, got {type(prompt).__name__}")
    last_user = next(m["content"] for m in reversed(row["prompt"]) if m["role"] == "user")
    if last_user.strip() != prompt.strip():
        raise BadRow(where, "prompt_mismatch", "chosen", f"the user turn in chosen ({last_user[:50]!r}) is not the "
                                                         f"row's prompt ({prompt[:50]!r})")
    return row


def unpaired_kto(record: dict[str, Any], where: str) -> dict[str, Any]:
    label = _field(record, "label", where)
    if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
        label = bool(label)
    if not isinstance(label, bool):
        raise BadRow(where, "bad_label", "label", f"expected true or false, got {label!r}")
    return {"id": _row_id(record, where), "prompt": _prompt(_field(record, "prompt", where), "prompt", where),
            "completion": _completion(_field(record, "completion", where), "completion", where), "label": label}


CONVERTERS = {"trl": pair_trl, "hh": pair_hh, "ultrafeedback": pair_ultrafeedback, "kto": unpaired_kto}


def detect_layout(record: Any) -> str | None:
    """The layout a record looks like, or None."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if {"prompt", "completion", "label"} <= keys:
        return "kto"
    if not {"chosen", "rejected"} <= keys:
        return None
    if "prompt" not in keys:
        return "hh"
    chosen = record["chosen"]
    if hasattr(chosen, "tolist"):
        chosen = chosen.tolist()
    if isinstance(chosen, list) and any(isinstance(m, dict) and ROLE_MAP.get(str(m.get("role", m.get("from"))).lower())
                                        == "user" for m in chosen):
        return "ultrafeedback"
    return "trl"


# ---------------------------------------------------------------- reading

def _records(source: str, *, offline: bool, split: str, revision: str | None,
             on_bad_rows: str) -> tuple[Iterator[tuple[str, Any]], str, dict[str, Any]]:
    kind = source_kind(source)
    if kind == "hub":
        return read_hub(source, split, revision, offline), f"hub dataset {source}", {"split": split, "revision": revision}
    if kind == "url":
        raise DataError(f"preference data {source}: download the file and name its path (URLs are read by the "
                        f"download stage)")
    path = Path(source).expanduser()
    return read_local(path, file_format(path), on_bad_rows), str(path), {"path": str(path.resolve())}


def load_preference(source: str | Path, layout: str = "auto", *, on_bad_rows: str = "error",
                    limit: int | None = None, offline: bool = True, split: str = "train",
                    revision: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read preference rows in any LAYOUTS into canonical rows; returns (rows, info) where info
    says the layout found, records read, rows kept and the rows skipped by reason."""
    if layout not in LAYOUTS:
        raise DataError(f"preference layout '{layout}' is unknown; known: {', '.join(LAYOUTS)}")
    records, label, where_from = _records(str(source), offline=offline, split=split, revision=revision,
                                          on_bad_rows=on_bad_rows)
    rows: list[dict[str, Any]] = []
    skipped = Skipped()
    found = None if layout == "auto" else layout
    read = 0
    for index, (where, record) in enumerate(records):
        if limit is not None and index >= limit:
            break
        read += 1
        try:
            if isinstance(record, BadRow):
                raise record
            if not isinstance(record, dict):
                raise BadRow(where, "not_an_object", None, f"expected an object, got {type(record).__name__}")
            if found is None:
                found = detect_layout(record)
                if found is None:
                    raise DataError(f"{label}, {where}: cannot tell the preference layout from the columns "
                                    f"{sorted(map(str, record))}: expected prompt/chosen/rejected (trl, ultrafeedback), "
                                    f"chosen/rejected (hh) or prompt/completion/label (kto)")
            rows.append(CONVERTERS[found](record, where))
        except BadRow as bad:
            if on_bad_rows == "error":
                raise DataError(bad.message(label) + " (set on_bad_rows: skip to drop and count such rows)") from None
            skipped.add(bad)
    if read == 0:
        raise DataError(f"{label}: the file holds no records")
    if not rows:
        raise DataError(f"{label}: every one of the {read} rows was skipped as bad ({dict(skipped.by_reason)})")
    info = {"origin": str(source), **where_from, "layout": found, "kind": "unpaired" if found == "kto" else "pairs",
            "records_read": read, "rows": len(rows), "skipped": skipped.as_dict()}
    return rows, info


def load_prompts(path: str | Path, answer_field: str = "answer") -> list[dict[str, Any]]:
    """Prompt rows with reference answers, for grpo and the verifier: {id, prompt (messages), answer}.
    A row gives its prompt (text or messages) and its answer in answer_field; prompt/completion rows
    (the format stage's train.jsonl) without it take the completion's text as the answer."""
    records, label, _ = _records(str(path), offline=True, split="train", revision=None, on_bad_rows="error")
    rows = []
    for where, record in records:
        try:
            if isinstance(record, BadRow):
                raise record
            if not isinstance(record, dict):
                raise BadRow(where, "not_an_object", None, f"expected an object, got {type(record).__name__}")
            prompt = _prompt(_field(record, "prompt", where), "prompt", where)
            if answer_field in record:
                answer = record[answer_field]
                if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
                    raise BadRow(where, "non_string_field", answer_field,
                                 f"expected the reference answer as text, got {type(answer).__name__}")
                answer = str(answer)
            elif "completion" in record:
                answer = "".join(m["content"] for m in _completion(record["completion"], "completion", where))
            else:
                raise BadRow(where, "missing_field", answer_field, f"no reference answer '{answer_field}' (or "
                                                                   f"completion) in this row")
        except BadRow as bad:
            raise DataError(bad.message(label)) from None
        rows.append({"id": _row_id(record, where), "prompt": prompt, "answer": answer})
    if not rows:
        raise DataError(f"{label}: the file holds no records")
    return rows


def unpair(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pairs -> KTO rows: each pair gives its chosen completion as desirable, its rejected one as not."""
    out = []
    for row in rows:
        if "label" in row:
            out.append(row)
            continue
        out.append({"id": f"{row['id']}:chosen", "prompt": row["prompt"], "completion": row["chosen"], "label": True})
        out.append({"id": f"{row['id']}:rejected", "prompt": row["prompt"], "completion": row["rejected"],
                    "label": False})
    return out


def write_rows(path: str | Path, rows: list[dict[str, Any]]) -> int:
    """Canonical rows as JSONL, atomically (load_preference reads them back: layout trl or kto)."""

    return write_jsonl(path, rows)
