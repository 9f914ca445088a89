"""Pair curation (lengths, chosen == rejected, repeated prompts): every drop accounted for."""

from __future__ import annotations

import json

import pytest
from conftest import SMOLLM2_DIR, reverse_rows

from tunesmith.data import pairs as curation
from tunesmith.data.preference import load_preference, write_rows
from tunesmith.recipe import section_defaults


def said(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from tunesmith.training import load_tokenizer

    return load_tokenizer(smollm2_dir, None, section_defaults("model", {"max_length": 256}))[0]


def some_pairs() -> list[dict]:
    rows = []
    for r in reverse_rows(6):
        words = r["prompt"][-1]["content"].split(": ", 1)[1]
        rows.append({"id": r["id"], "prompt": r["prompt"], "chosen": r["completion"], "rejected": said(words)})
    rows[1]["rejected"] = said("  " + rows[1]["chosen"][0]["content"].upper())  # the same text, other case/spaces
    rows[2]["chosen"] = said("lamp " * 150)                                       # long
    rows[4] = {**rows[4], "prompt": rows[0]["prompt"]}                            # a repeated prompt
    return rows


def test_curation_drops_by_reason_and_adds_up(tokenizer):
    pref = section_defaults("preference", {"max_tokens": 120})
    kept, report, counts = curation.curate(some_pairs(), tokenizer, pref)
    assert report["dropped"] == {"chosen_equals_rejected": 1, "too_short": 0, "too_long": 1, "duplicate_prompt": 1}
    assert report["rows_in"] == 6 == report["rows_out"] + sum(report["dropped"].values())
    assert [r["id"] for r in kept] == ["r0-0", "r0-3", "r0-5"]
    assert report["dropped_examples"] == {"chosen_equals_rejected": ["r0-1"], "too_long": ["r0-2"],
                                          "duplicate_prompt": ["r0-4"]}
    assert counts[2]["prompt_chosen"] > 120 >= counts[0]["prompt_chosen"] > counts[0]["prompt"]
    # Nothing asked for, nothing dropped but identical pairs.
    pref = section_defaults("preference", {"dedupe_prompt": False})
    assert curation.curate(some_pairs(), tokenizer, pref)[1]["rows_out"] == 5


def test_curation_stage_writes_pairs_report_and_histogram(tmp_path):
    source = tmp_path / "pairs.jsonl"
    write_rows(source, some_pairs())
    section = {"preference": section_defaults("preference", {"max_tokens": 120}),
               "model": section_defaults("model", {"max_length": 256})}
    out = tmp_path / "out"
    result = curation.curate_stage(str(source), str(SMOLLM2_DIR), "", section, str(out / "pairs.jsonl"),
                                   str(out / "pairs_report.json"), str(out / "pairs_tokens.png"))
    assert result.metrics["rows_in"] == 6 and result.metrics["rows_out"] == 3
    assert result.summary == "pairs: 6 -> 3 (1 chosen_equals_rejected, 1 too_long, 1 duplicate_prompt)"
    report = json.loads((out / "pairs_report.json").read_text())
    assert report["source"]["layout"] == "trl" and report["tokens_in"]["prompt_chosen"]["max"] > 120
    assert len(load_preference(out / "pairs.jsonl")[0]) == 3
    assert (out / "pairs_tokens.png").read_bytes()[:4] == b"\x89PNG"
