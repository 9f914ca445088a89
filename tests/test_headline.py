"""The headline a recipe without evaluate.headline gets: chosen from the held-out references that
were scored (exact match for short answers, chrF for free-form ones), with the reason in
compare.json, first in the terminal summary and first in the model cards. No model: seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith import publishing, scorecard
from tunesmith.errors import TunesmithError

REPO = Path(__file__).resolve().parents[1]


def _scores(label: str, em: float, chrf: float, logprob: float, n: int) -> dict:
    """evaluation.score's shape for one model on heldout."""
    return {"model": f"models/{label}", "label": label, "tasks": {"heldout": {
        "metric": "exact_match,none", "score": em, "limit": n,
        "metrics": {"exact_match": em, "chrf": chrf, "ref_logprob": logprob}}}}


def _codegen_answers(shared_data: Path, n: int = 60) -> list[str]:
    rows = json.loads((shared_data / "gpteacher" / "codegen-instruct.json").read_text(encoding="utf-8"))
    return [r["response"] for r in rows[:n]]


def _reverse_answers(n: int = 60) -> list[str]:
    lines = (REPO / "data" / "demo" / "reverse_words.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["output"] for line in lines[:n] if line.strip()]


def test_free_form_references_lead_with_chrf(shared_data):
    """GPTeacher codegen answers (code, tens of words): the 0 -> 0 exact match is not the headline;
    chrF is, and compare.json says why."""
    answers = _codegen_answers(shared_data)
    out = scorecard.compare(_scores("base", 0.0, 19.6, -0.647, 60), _scores("tuned", 0.0, 27.8, -0.594, 60),
                            None, answers)
    head = out["headline"]
    assert (head["task"], head["metric"], head["chosen_by"]) == ("heldout", "chrf", "data")
    assert (head["base"], head["tuned"]) == (19.6, 27.8) and head["delta"] == pytest.approx(8.2)
    assert "free-form" in head["reason"] and f"> {scorecard.FREE_FORM_WORDS}" in head["reason"]
    assert list(out)[0] == "headline"  # it leads the file


def test_short_references_keep_exact_match():
    """The reverse-words demo (a handful of words per answer) keeps exact match."""
    answers = _reverse_answers()
    assert sorted(len(a.split()) for a in answers)[len(answers) // 2] <= scorecard.FREE_FORM_WORDS
    out = scorecard.compare(_scores("base", 0.0, 35.7, -2.0, 50), _scores("tuned", 0.94, 97.0, -0.05, 50),
                            None, answers)
    head = out["headline"]
    assert (head["metric"], head["chosen_by"], head["tuned"]) == ("exact_match", "data", 0.94)
    assert head["reason"].startswith("short references")


def test_recipe_headline_wins_and_other_tasks_use_their_primary_metric(shared_data):
    base, tuned = _scores("base", 0.0, 19.6, -0.647, 60), _scores("tuned", 0.0, 27.8, -0.594, 60)
    head = scorecard.compare(base, tuned, {"task": "heldout", "metric": "ref_logprob"},
                             _codegen_answers(shared_data))["headline"]
    assert (head["metric"], head["chosen_by"], head["tuned"]) == ("ref_logprob", "recipe", -0.594)
    with pytest.raises(TunesmithError, match="did you mean 'chrf'"):
        scorecard.compare(base, tuned, {"task": "heldout", "metric": "chrff"})
    gsm = {"tasks": {"gsm8k_local": {"metric": "exact_match,strict-match", "score": 0.1, "limit": 20}}}
    head = scorecard.compare(gsm, {"tasks": {"gsm8k_local": dict(gsm["tasks"]["gsm8k_local"], score=0.2)}})["headline"]
    assert (head["metric"], head["chosen_by"]) == ("exact_match,strict-match", "default")


def test_cards_lead_with_the_headline(shared_data, tmp_path):
    """The card's first score line is the headline (chrF here), and so is the model-index's first
    result, the one the Hub shows."""
    out = scorecard.compare(_scores("base", 0.0, 19.6, -0.647, 60), _scores("tuned", 0.0, 27.8, -0.594, 60),
                            None, _codegen_answers(shared_data))
    compare = tmp_path / "compare.json"
    compare.write_text(json.dumps(out))
    flat = publishing.flat_scores(str(compare))
    table = publishing._scores_table(flat)
    lines = [line for line in table.splitlines() if line.strip()]
    assert lines[1].startswith("**Headline: heldout chrf** base 19.600 -> tuned 27.800 (free-form")
    assert lines[4].startswith("| heldout | chrf | 19.600 | 27.800 |")  # first row of the table
    card = publishing.card(kind="merged", repo_id="codegen-main-merged", recipe="codegen", variant="main",
                           base_model="HuggingFaceTB/SmolLM2-135M-Instruct", datasets=[], license=None, tags=[],
                           scores=flat, body=table)
    results = card.data.eval_results
    assert (results[0].metric_type, results[0].metric_value) == ("chrf", 27.8)
    assert results[1].metric_type == "exact_match"
