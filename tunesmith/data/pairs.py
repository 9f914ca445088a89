"""Curation of preference pairs, the way SFT rows are curated: token counts for prompt + chosen and
prompt + rejected (rendered with the chat template, as training renders them), length filters,
pairs whose chosen equals their rejected, repeated prompts. Every drop is counted by reason, and
rows_in == rows_out + sum(dropped).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.contract import load_tokenizer, tokenize_completion
from tunesmith.data.duplicates import normalise
from tunesmith.data.plots import token_histogram
from tunesmith.data.preference import load_preference, write_rows
from tunesmith.errors import DataError
from tunesmith.fileio import write_json
from tunesmith.result import Result

# In the order they are applied: a repeated prompt keeps its first pair that passed the others.
REASONS = ("chosen_equals_rejected", "too_short", "too_long", "duplicate_prompt")
MAX_EXAMPLES = 5


def _text(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def token_counts(rows: list[dict[str, Any]], tokenizer: Any) -> list[dict[str, int]]:
    """Per pair: prompt tokens (with the generation prompt) and prompt + chosen / prompt + rejected."""
    out = []
    for row in rows:
        prompt_ids, chosen = tokenize_completion(tokenizer, row["prompt"], row["chosen"])
        _, rejected = tokenize_completion(tokenizer, row["prompt"], row["rejected"])
        out.append({"prompt": len(prompt_ids), "prompt_chosen": len(chosen), "prompt_rejected": len(rejected)})
    return out


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "median": 0, "p95": 0, "max": 0}
    arr = np.asarray(values)
    return {"min": int(arr.min()), "median": float(np.median(arr)), "p95": float(np.percentile(arr, 95)),
            "max": int(arr.max())}


def curate(rows: list[dict[str, Any]], tokenizer: Any, section: dict[str, Any]
           ) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, int]]]:
    """Canonical pairs -> (kept pairs, report, token counts of every input pair), per the recipe's
    preference section (min_tokens, max_tokens, drop_equal, dedupe_prompt)."""
    counts = token_counts(rows, tokenizer)
    dropped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    seen_prompts: set[str] = set()
    kept = []
    for row, n in zip(rows, counts):
        shorter, longer = min(n["prompt_chosen"], n["prompt_rejected"]), max(n["prompt_chosen"], n["prompt_rejected"])
        reason = None
        if section["drop_equal"] and normalise(_text(row["chosen"])) == normalise(_text(row["rejected"])):
            reason = "chosen_equals_rejected"
        elif shorter < section["min_tokens"]:
            reason = "too_short"
        elif section["max_tokens"] is not None and longer > section["max_tokens"]:
            reason = "too_long"
        elif section["dedupe_prompt"]:
            key = normalise(_text(row["prompt"]))
            if key in seen_prompts:
                reason = "duplicate_prompt"
            seen_prompts.add(key)
        if reason is None:
            kept.append(row)
        else:
            dropped[reason] += 1
            examples.setdefault(reason, [])
            if len(examples[reason]) < MAX_EXAMPLES:
                examples[reason].append(str(row["id"]))
    report = {"rows_in": len(rows), "rows_out": len(kept), "dropped": {r: int(dropped[r]) for r in REASONS},
              "dropped_examples": examples,
              "settings": {k: section[k] for k in ("min_tokens", "max_tokens", "drop_equal", "dedupe_prompt")},
              "tokens_in": {"prompt": _stats([c["prompt"] for c in counts]),
                            "prompt_chosen": _stats([c["prompt_chosen"] for c in counts]),
                            "prompt_rejected": _stats([c["prompt_rejected"] for c in counts])}}
    if report["rows_in"] != report["rows_out"] + sum(report["dropped"].values()):  # pragma: no cover - a bug
        raise AssertionError(f"pair curation lost rows: {report}")
    if not kept:
        raise DataError(f"pair curation removed every one of the {len(rows)} pairs ({dict(dropped)}); loosen "
                        f"preference.min_tokens / max_tokens")
    return kept, report, counts


def curate_stage(pairs_in: str, base: str, template: str, section: dict[str, Any], pairs_out: str,
                 report_path: str, hist_path: str) -> Result:
    """Script-shaped: pairs (any layout) -> curated canonical pairs, report.json, token histogram.
    section: the recipe's resolved sections, of which preference and model are read."""

    pref = section["preference"]
    rows, info = load_preference(pairs_in, pref["layout"], on_bad_rows=pref["on_bad_rows"], limit=pref["limit"])
    if info["kind"] != "pairs":
        raise DataError(f"{pairs_in}: pair curation needs chosen/rejected pairs; this file holds KTO rows")
    tokenizer, _ = load_tokenizer(base, template or None, section["model"])
    kept, report, counts = curate(rows, tokenizer, pref)
    report["source"] = info
    write_rows(pairs_out, kept)
    write_json(report_path, report)
    token_histogram({name: np.asarray([c[name] for c in counts]) for name in ("prompt", "prompt_chosen",
                                                                              "prompt_rejected")},
                    hist_path, title=f"Preference pairs: tokens ({Path(pairs_in).name})")
    drops = ", ".join(f"{n} {r}" for r, n in report["dropped"].items() if n)
    return Result(metrics={"rows_in": report["rows_in"], "rows_out": report["rows_out"],
                           **{f"dropped_{r}": n for r, n in report["dropped"].items()},
                           "skipped_bad_rows": info["skipped"]["count"]},
                  artifacts=[report_path, hist_path],
                  summary=f"pairs: {report['rows_in']} -> {report['rows_out']}" + (f" ({drops})" if drops else ""))
