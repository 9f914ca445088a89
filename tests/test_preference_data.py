"""Preference data: each layout people have, read into canonical rows; every bad row named by file,
row and field; prompt rows with reference answers for grpo and the verifier."""

from __future__ import annotations

import json

import pytest

from tunesmith.data import preference
from tunesmith.errors import DataError

USER = {"role": "user", "content": "Reverse: a, b"}
GOOD = {"role": "assistant", "content": "b, a"}
BAD = {"role": "assistant", "content": "a, b"}


def test_trl_layout_with_strings_and_message_lists(jsonl_file):
    path = jsonl_file([
        {"prompt": "Reverse: a, b", "chosen": "b, a", "rejected": "a, b"},
        {"id": "x7", "prompt": [{"role": "system", "content": "Be terse."}, USER], "chosen": [GOOD], "rejected": [BAD]},
    ])
    rows, info = preference.load_preference(path)
    assert info["layout"] == "trl" and info["kind"] == "pairs" and info["rows"] == 2
    assert rows[0] == {"id": "1", "prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}  # id: the line number
    assert rows[1]["id"] == "x7" and rows[1]["prompt"][0]["role"] == "system"


def test_trl_layout_bad_row_names_file_row_and_field(jsonl_file):
    path = jsonl_file([{"prompt": "p", "chosen": "c", "rejected": "r"},
                       {"prompt": "p", "chosen": [USER, GOOD], "rejected": "r"}])
    with pytest.raises(DataError, match=r"data\.jsonl, line 2, field 'chosen\[0\]\.role': a completion holds "
                                        r"assistant turns only, found a user turn"):
        preference.load_preference(path, layout="trl")


def test_hh_strings_split_at_the_last_assistant_turn(jsonl_file):
    shared = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Reverse: a, b"
    path = jsonl_file([{"chosen": shared + "\n\nAssistant: b, a", "rejected": shared + "\n\nAssistant: a, b"}])
    rows, info = preference.load_preference(path)
    assert info["layout"] == "hh"
    assert rows[0]["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, USER]
    assert rows[0]["chosen"] == [GOOD] and rows[0]["rejected"] == [BAD]


def test_hh_message_lists(jsonl_file):
    path = jsonl_file([{"chosen": [{"from": "human", "value": "Reverse: a, b"}, {"from": "gpt", "value": "b, a"}],
                        "rejected": [USER, BAD]}])
    rows, _ = preference.load_preference(path, layout="hh")
    assert rows[0] == {"id": "1", "prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}


def test_hh_conversations_that_do_not_share_the_prompt_are_an_error(jsonl_file):
    path = jsonl_file([{"chosen": "\n\nHuman: Reverse: a, b\n\nAssistant: b, a",
                        "rejected": "\n\nHuman: Reverse: a, c\n\nAssistant: c, a"}])
    with pytest.raises(DataError, match=r"line 1, field 'rejected': chosen and rejected do not share the "
                                        r"conversation before their last assistant turn: turn 0"):
        preference.load_preference(path)


def test_hh_string_without_markers_is_an_error(jsonl_file):
    path = jsonl_file([{"chosen": "just text", "rejected": "\n\nHuman: q\n\nAssistant: a"}])
    with pytest.raises(DataError, match=r"line 1, field 'chosen': no '\\n\\nHuman:'"):
        preference.load_preference(path, layout="hh")


def test_ultrafeedback_binarized_rows(tmp_path):
    # HuggingFaceH4/ultrafeedback_binarized's columns, as a parquet file like the hub's.
    import pandas as pd

    frame = pd.DataFrame([{"prompt": "Reverse: a, b", "prompt_id": "abc123", "chosen": [USER, GOOD],
                           "rejected": [USER, BAD], "messages": [USER, GOOD], "score_chosen": 8.0,
                           "score_rejected": 3.5}])
    path = tmp_path / "train_prefs.parquet"
    frame.to_parquet(path)
    rows, info = preference.load_preference(path)
    assert info["layout"] == "ultrafeedback"
    assert rows == [{"id": "abc123", "prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}]


def test_ultrafeedback_prompt_that_differs_from_its_user_turn_is_an_error(jsonl_file):
    path = jsonl_file([{"prompt": "Reverse: x, y", "chosen": [USER, GOOD], "rejected": [USER, BAD]}])
    with pytest.raises(DataError, match=r"line 1, field 'chosen': the user turn in chosen \('Reverse: a, b'\) is not "
                                        r"the row's prompt"):
        preference.load_preference(path, layout="ultrafeedback")


def test_kto_rows_and_unpairing(jsonl_file):
    path = jsonl_file([{"prompt": "Reverse: a, b", "completion": "b, a", "label": True},
                       {"prompt": [USER], "completion": [BAD], "label": 0}])
    rows, info = preference.load_preference(path)
    assert info["layout"] == "kto" and info["kind"] == "unpaired"
    assert [r["label"] for r in rows] == [True, False] and rows[1]["completion"] == [BAD]
    pairs = [{"id": "p1", "prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}]
    assert preference.unpair(pairs) == [
        {"id": "p1:chosen", "prompt": [USER], "completion": [GOOD], "label": True},
        {"id": "p1:rejected", "prompt": [USER], "completion": [BAD], "label": False}]


def test_kto_label_that_is_not_boolean_is_an_error(jsonl_file):
    path = jsonl_file([{"prompt": "p", "completion": "c", "label": "yes"}])
    with pytest.raises(DataError, match=r"line 1, field 'label': expected true or false, got 'yes'"):
        preference.load_preference(path)


def test_bad_rows_skipped_and_counted_when_asked(jsonl_file):
    path = jsonl_file([{"prompt": "p", "chosen": "c", "rejected": "r"}, "{not json",
                       {"prompt": "p", "chosen": "c"}, {"prompt": "", "chosen": "c", "rejected": "r"}])
    rows, info = preference.load_preference(path, on_bad_rows="skip")
    assert len(rows) == 1 and info["records_read"] == 4
    assert info["skipped"]["by_reason"] == {"malformed_json": 1, "missing_field": 1, "empty_prompt": 1}
    assert info["records_read"] == info["rows"] + info["skipped"]["count"]


def test_unknown_layout_columns_are_an_error(jsonl_file):
    path = jsonl_file([{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"line 1: cannot tell the preference layout from the columns "
                                        r"\['answer', 'question'\]"):
        preference.load_preference(path)


def test_canonical_rows_round_trip(tmp_path):
    rows = [{"id": "a", "prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}]
    assert preference.write_rows(tmp_path / "pairs.jsonl", rows) == 1
    back, info = preference.load_preference(tmp_path / "pairs.jsonl")
    assert back == rows and info["layout"] == "trl"


def test_prompt_rows_from_answers_or_completions(jsonl_file):
    path = jsonl_file([{"id": 3, "prompt": "What is 2+2?", "answer": "#### 4"},
                       {"prompt": [USER], "completion": [GOOD]}])
    rows = preference.load_prompts(path)
    assert rows == [{"id": "3", "prompt": [{"role": "user", "content": "What is 2+2?"}], "answer": "#### 4"},
                    {"id": "2", "prompt": [USER], "answer": "b, a"}]
    bad = jsonl_file([{"prompt": "q"}], name="bad.jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 1, field 'answer': no reference answer"):
        preference.load_prompts(bad)


def test_gsm8k_prompt_rows_from_the_real_file(shared_data, tmp_path):
    # GSM8K's own question/answer rows, renamed to prompt/answer as a recipe's data stage would.
    lines = (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:50]
    rows = [{"prompt": json.loads(line)["question"], "answer": json.loads(line)["answer"]} for line in lines]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = preference.load_prompts(path)
    assert len(loaded) == 50 and all("####" in r["answer"] for r in loaded)
