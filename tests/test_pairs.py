"""Pair curation (lengths, chosen == rejected, repeated prompts) and pairs built by a verifier from a
model's own samples: every drop and every prompt accounted for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SMOLLM2_DIR, reverse_rows

from tunesmith.data import pairs as curation
from tunesmith.data.preference import load_preference, write_rows
from tunesmith.schema import section_defaults
from tunesmith.verifier import pairs_from_samples


def said(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def odd_length(prompts, completions, **kwargs):
    """A custom reward for the verifier test: about half of a random model's samples pass."""
    return [float(len(c[-1]["content"]) % 2) for c in completions]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from tunesmith.contract import load_tokenizer

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


def test_verifier_accounting_from_given_scores():
    prompts = [{"id": str(i), "prompt": [{"role": "user", "content": f"q{i}"}], "answer": f"a{i}"} for i in range(4)]
    answers = [["x", "y"], ["a1", "z"], ["a2", "a2"], ["p", "q"]]
    scores = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [float("nan"), 0.0]]
    pairs, report = pairs_from_samples(prompts, answers, scores, correct_at=1.0, use_reference=True)
    assert {k: report[k] for k in ("prompts", "samples", "pairs", "all_correct", "all_wrong", "mixed",
                                   "pairs_from_samples", "pairs_from_reference", "correct_samples")} == \
        {"prompts": 4, "samples": 8, "pairs": 3, "all_correct": 1, "all_wrong": 2, "mixed": 1,
         "pairs_from_samples": 1, "pairs_from_reference": 2, "correct_samples": 3}
    assert pairs[0] == {"id": "0", "prompt": prompts[0]["prompt"], "chosen": said("a0"), "rejected": said("x"),
                        "chosen_from": "reference"}
    assert pairs[1]["chosen"] == said("a1") and pairs[1]["rejected"] == said("z")
    assert report["examples"] == {"all_correct": ["2"], "all_wrong": ["0", "3"]}
    pairs, report = pairs_from_samples(prompts, answers, scores, correct_at=1.0, use_reference=False)
    assert report["pairs"] == 1 and report["all_wrong"] == 2


def test_verifier_samples_a_model_and_builds_pairs_that_add_up(tmp_path, tiny_llama_dir):
    from tunesmith.verifier import build_stage

    prompts = tmp_path / "train.jsonl"  # the format stage's rows: the completion is the reference
    prompts.write_text("".join(json.dumps(r) + "\n" for r in reverse_rows(6, 1)))
    section = {"preference": section_defaults("preference", {"verifier": {
                   "reward": "test_pairs:odd_length", "samples": 3, "max_new_tokens": 6, "seed": 7}}),
               "model": section_defaults("model", {"max_length": 256})}
    template = str(SMOLLM2_DIR / "chat_template.jinja")
    result = build_stage(str(tiny_llama_dir), str(prompts), template, section, str(tmp_path / "a/pairs.jsonl"),
                         str(tmp_path / "a/report.json"))
    report = json.loads((tmp_path / "a/report.json").read_text())
    assert report["prompts"] == 6 and report["samples"] == 18
    assert report["prompts"] == report["all_correct"] + report["all_wrong"] + report["mixed"]
    assert report["pairs"] == report["mixed"] + report["all_wrong"] == result.metrics["pairs"]
    pairs, info = load_preference(tmp_path / "a/pairs.jsonl")
    assert len(pairs) == report["pairs"] and info["layout"] == "trl"
    for pair in pairs:
        assert len(pair["chosen"][0]["content"]) % 2 == 1 or pair["chosen"][0]["content"] in \
            {r["completion"][0]["content"] for r in reverse_rows(6, 1)}
        assert len(pair["rejected"][0]["content"]) % 2 == 0
    # Seeded per prompt: the same settings sample the same answers.
    build_stage(str(tiny_llama_dir), str(prompts), template, section, str(tmp_path / "b/pairs.jsonl"),
                str(tmp_path / "b/report.json"))
    assert Path(tmp_path / "a/pairs.jsonl").read_text() == Path(tmp_path / "b/pairs.jsonl").read_text()
