"""The decontaminate stage: GSM8K test questions planted in a GSM8K train sample are found by the
default 13-gram check (every verbatim copy, most edited ones, few clean rows), a train row copied
from the held-out split is dropped without moving the split, and each task's count reaches
compare.json. n-grams only (the embedding check is measured by bench/decontaminate_plant.py):
about a second."""

from __future__ import annotations

import pandas as pd
import pytest

from plant_helpers import planted_sample
from tunesmith import scorecard
from tunesmith.data import contamination as decon
from tunesmith.data import formatting
from tunesmith.errors import DataError
from tunesmith.schema import section_defaults


def _frame(rows):
    return pd.DataFrame([{"input": "", "system": "", "text": "", **r} for r in rows])


def test_planted_gsm8k_test_questions_are_found_by_13_grams(shared_data):
    rows, docs, kinds = planted_sample(shared_data / "gsm8k", clean=500, verbatim=30, edited=20)
    section = section_defaults("decontaminate", {"split_leakage": False})
    kept, report = decon.run(_frame(rows), {"gsm8k_local": docs}, section, section_defaults("format"))
    flagged = {int(i) for i, c in zip(kept["id"], kept["contamination"]) if c == "gsm8k_local"}
    assert len(kept) == len(rows)  # flag (the default) keeps every row
    assert kinds["verbatim"] <= flagged  # every verbatim copy
    # measured: 16 of 20 edited, and 1 of 500 clean rows (a train question on the same template as
    # a test one: "A train/plane travels N miles in 3 hours. At the same rate, ...")
    assert len(kinds["edited"] & flagged) >= 14
    assert len(kinds["clean"] & flagged) <= 2
    task = report["tasks"]["gsm8k_local"]
    assert task["rows_matched"] == len(flagged) and task["documents"] == len(docs)
    best = task["examples"][0]
    assert best["overlap"] == 1.0 and best["row_id"] in kinds["verbatim"]


def test_a_train_row_copied_from_the_held_out_split_is_dropped_and_the_split_stays():
    rows = [{"id": i, "instruction": f"Question number {i}: list the seven colours of the rainbow in order {i}",
             "output": f"red orange yellow green blue indigo violet, answer {i}"} for i in range(40)]
    fmt = section_defaults("format", {"eval_fraction": 0.1})
    held = formatting.split_positions(41, fmt["eval_fraction"], fmt["eval_max_rows"], fmt["seed"]).tolist()
    assert 0 not in held  # the copy goes first, into train; the row it copies is held out
    copy = dict(rows[held[0] - 1], id=99)
    section = section_defaults("decontaminate", {"action": "drop"})
    kept, report = decon.run(_frame([copy] + rows), {}, section, fmt)
    assert 99 not in set(kept["id"]) and len(kept) == 40
    assert report["heldout"]["rows_matched"] == 1
    assert report["heldout"]["examples"][0]["heldout_row_id"] == held[0] - 1
    train, evals = formatting.build(kept, fmt)  # format keeps the split fixed before the drop
    assert sorted(r["id"] for r in evals) == sorted(int(kept["id"][i]) for i in range(len(kept))
                                                    if kept["split"][i] == "eval")


def test_short_documents_match_whole_and_normalising_ignores_case_punctuation_and_unicode_forms():
    docs = decon.Documents.build("t", ["What is 2+2?", "x"], 13)
    assert docs.match("Please answer: WHAT is 2+2 ?") == {0: 1}  # '2+2' and '22' differ only in '+'
    assert decon.words("Ｆｕｌｌｗｉｄｔｈ, text!") == ["fullwidth", "text"]


def test_a_bad_document_file_names_file_and_line(tmp_path):
    bad = tmp_path / "test.jsonl"
    bad.write_text('{"question": "a"}\n{not json\n')
    with pytest.raises(DataError, match=r"test.jsonl, line 2: not valid JSON"):
        decon.read_documents(bad, "gsm8k_local")


def test_each_task_shows_its_contamination_count_beside_its_score():
    comparison = {"tasks": {"gsm8k_local": {}, "heldout": {}, "mmlu": {}}}
    report = {"action": "flag", "ngram": 13, "embedding": None, "heldout": {"rows_checked": 90, "rows_matched": 2},
              "tasks": {"gsm8k_local": {"rows_checked": 100, "rows_matched": 7}},
              "not_checked": {"mmlu": "an lm-eval built-in task"}}
    scorecard.add_contamination(comparison, report)
    tasks = comparison["tasks"]
    assert tasks["gsm8k_local"]["contamination"] == {"rows": 7, "rows_checked": 100, "action": "flag",
                                                     "method": "13-gram"}
    assert tasks["heldout"]["contamination"]["rows"] == 2
    assert tasks["mmlu"]["contamination"] == {"rows": None, "not_checked": "an lm-eval built-in task"}


class _FakeEmbedder:
    """Texts about Paris point one way, the rest another; counts what it embeds."""

    def __init__(self):
        self.embedded = 0

    def encode(self, texts, **kwargs):
        import numpy as np

        self.embedded += len(texts)
        return np.array([[1.0, 0.0] if "Paris" in t else [0.0, 1.0] for t in texts], dtype="float32")


def test_the_embedding_check_finds_a_paraphrase_the_n_grams_miss_and_embeds_each_text_once():
    rows = [{"id": 0, "instruction": "Paris is the capital of which country", "output": "France"},
            {"id": 1, "instruction": "Name a prime number", "output": "7"}]
    section = section_defaults("decontaminate", {"embedding": {"enabled": True}, "split_leakage": False})
    fake = _FakeEmbedder()
    kept, report = decon.run(_frame(rows), {"t": ["Paris: which country has it as its capital?"]}, section,
                             section_defaults("format"), embedder=fake)
    assert list(kept["contamination"]) == ["t", ""]
    assert report["tasks"]["t"]["by_method"] == {"ngram": 0, "embedding": 1, "embedding_only": 1}
    assert report["tasks"]["t"]["examples"][0]["similarity"] == 1.0
    assert fake.embedded == 3
