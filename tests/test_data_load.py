"""download: formats, column mapping, ShareGPT conversion, and every bad-input error."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tunesmith import fileio
from tunesmith.data import load
from tunesmith.stages.download import download
from tunesmith.errors import DataError
from tunesmith.schema import section_defaults

ROWS = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Add 1+1", "input": "numbers", "output": "2"}]


def section(source, **kw):
    """The dataset section as the stage gets it (schema defaults filled)."""
    return section_defaults("dataset", {"source": str(source), **kw})


def test_jsonl_to_canonical_rows(jsonl_file):
    out = load.load(section(jsonl_file(ROWS)), offline=True)
    frame = out.frame
    assert list(frame.columns) == ["id", "instruction", "input", "output", "system", "messages", "text"]
    assert frame["id"].tolist() == [0, 1]
    assert frame.loc[1, "input"] == "numbers" and frame.loc[0, "input"] == ""
    assert out.info["rows"] == 2 and len(out.info["sha256"]) == 64


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_other_formats_and_column_mapping(tmp_path, fmt):
    rows = [{"question": "q1", "response": "a1"}, {"question": "q2", "response": "a2"}]
    path = tmp_path / f"d.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    frame = load.load(section(path, columns={"instruction": "question", "output": "response", "input": None}),
                      offline=True).frame
    assert frame["instruction"].tolist() == ["q1", "q2"] and frame["output"].tolist() == ["a1", "a2"]


def test_sharegpt_conversations_become_messages(tmp_path):
    rows = [{"id": "a", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                          {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye?"},
                                          {"from": "gpt", "value": "Bye"}, {"from": "human", "value": "dangling"}]}]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(rows))
    frame = load.load(section(path, schema="messages", columns={"messages": "conversations"}), offline=True).frame
    msgs = frame.loc[0, "messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]  # dangling user dropped
    assert frame.loc[0, "system"] == "Be brief." and frame.loc[0, "output"] == "Bye"
    assert frame.loc[0, "instruction"] == "Hi\n\nHello\n\nBye?"


def test_download_stage_writes_source_json(tmp_path, jsonl_file):
    raw, src = tmp_path / "raw.parquet", tmp_path / "source.json"
    metrics = download(section(jsonl_file(ROWS)), str(raw), str(src), offline=True).metrics
    info = json.loads(src.read_text())
    assert metrics["rows_out"] == 2
    assert info["raw_sha256"] == fileio.sha256(raw) and info["rows"] == 2
    assert {"origin", "sha256", "columns", "skipped"} <= set(info)
    assert len(load.read_rows(raw)) == 2


# ---------------------------------------------------------------- bad input

def test_malformed_jsonl_line_names_file_and_line(jsonl_file):
    path = jsonl_file([ROWS[0], ROWS[1], '{"instruction": "x", "output": '])
    with pytest.raises(DataError, match=rf"{path.name}, line 3: not valid JSON"):
        load.load(section(path), offline=True)
    out = load.load(section(path, on_bad_rows="skip"), offline=True)
    assert len(out.frame) == 2 and out.info["skipped"]["by_reason"] == {"malformed_json": 1}


def test_missing_mapped_column_lists_existing_columns(jsonl_file):
    path = jsonl_file(ROWS)
    with pytest.raises(DataError, match=r"mapped column 'response' \(dataset.columns.output\) is missing; "
                                        r"the columns that exist are: instruction, output, input"):
        load.load(section(path, columns={"output": "response"}), offline=True)
    with pytest.raises(DataError, match="mapped column 'response'"):
        load.load(section(path, columns={"output": "response"}, on_bad_rows="skip"), offline=True)


def test_field_missing_in_one_row(jsonl_file):
    path = jsonl_file([ROWS[0], {"instruction": "no answer"}])
    with pytest.raises(DataError, match=r"line 2, field 'output': no 'output'"):
        load.load(section(path), offline=True)
    assert load.load(section(path, on_bad_rows="skip"), offline=True).info["skipped"]["by_reason"] == {"missing_field": 1}


def test_non_string_field_names_line_and_field(jsonl_file):
    path = jsonl_file([ROWS[0], {"instruction": "n", "output": 42}])
    with pytest.raises(DataError, match=r"line 2, field 'output': expected a string for output, got int"):
        load.load(section(path), offline=True)
    out = load.load(section(path, on_bad_rows="skip"), offline=True)
    assert out.info["skipped"]["by_reason"] == {"non_string_field": 1} and len(out.frame) == 1


def test_non_utf8_bytes(jsonl_file, tmp_path):
    path = jsonl_file([ROWS[0], b'{"instruction": "caf\xe9", "output": "x"}', ROWS[1]])
    with pytest.raises(DataError, match=rf"{path.name}, line 2: bytes that are not UTF-8"):
        load.load(section(path), offline=True)
    assert load.load(section(path, on_bad_rows="skip"), offline=True).info["skipped"]["by_reason"] == {"non_utf8": 1}
    # A whole-document format: the error gives the line; skip drops the record holding the bytes.
    doc = tmp_path / "d.json"
    doc.write_bytes(b'[{"instruction": "a", "output": "b"},\n {"instruction": "caf\xe9", "output": "x"}]')
    with pytest.raises(DataError, match=r"d.json, line 2: bytes that are not UTF-8"):
        load.load(section(doc), offline=True)
    out = load.load(section(doc, on_bad_rows="skip"), offline=True)
    assert len(out.frame) == 1 and out.info["skipped"]["examples"][0]["field"] == "instruction"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty.jsonl: the file is empty"):
        load.load(section(path), offline=True)
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(DataError, match="holds no records"):
        load.load(section(tmp_path / "none.json"), offline=True)


def test_hub_id_while_offline_says_how_to_use_a_local_copy():
    with pytest.raises(DataError, match=r"hub dataset id.*offline.*set dataset.source: data/openai_gsm8k.jsonl"):
        load.load(section("openai/gsm8k"), offline=True)


def test_missing_local_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load.load(section(tmp_path / "nope.jsonl"), offline=True)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="set dataset.format"):
        load.load(section(tmp_path / "d.txt", format="auto"), offline=True)


def test_all_rows_bad_is_an_error(jsonl_file):
    path = jsonl_file(["nope", "{bad"])
    with pytest.raises(DataError, match="every one of the 2 rows was skipped"):
        load.load(section(path, on_bad_rows="skip"), offline=True)


def test_limit_reads_first_rows(jsonl_file):
    assert len(load.load(section(jsonl_file(ROWS * 5), limit=3), offline=True).frame) == 3


def test_limit_can_take_a_seeded_random_sample_in_source_order(jsonl_file):
    path = jsonl_file([{"instruction": f"q{i}", "output": str(i)} for i in range(20)])
    first = load.load(section(path, limit=5), offline=True).frame["output"].tolist()
    out = load.load(section(path, limit=5, sample="random", seed=1), offline=True)
    picked = [int(v) for v in out.frame["output"]]
    assert first == ["0", "1", "2", "3", "4"] and picked != [0, 1, 2, 3, 4]
    assert len(picked) == 5 and picked == sorted(picked)  # source order kept
    assert picked == [int(v) for v in load.load(section(path, limit=5, sample="random", seed=1),
                                                offline=True).frame["output"]]
    assert picked != [int(v) for v in load.load(section(path, limit=5, sample="random", seed=2),
                                                offline=True).frame["output"]]
    assert out.info["sample"] == {"strategy": "random", "seed": 1, "rows": 5, "of_records": 20}


def test_a_bad_row_in_a_random_sample_is_named_by_its_line_in_the_source(jsonl_file):
    rows = [{"instruction": f"q{i}", "output": str(i)} for i in range(6)] + [{"instruction": "q6"}]
    with pytest.raises(DataError, match=r"line 7"):
        load.load(section(jsonl_file(rows), limit=7, sample="random"), offline=True)


def test_a_changed_source_is_reported_on_the_next_download(tmp_path, jsonl_file, caplog):
    """Snakemake deletes source.json before rerunning download; the history beside it still tells
    that the same origin now returns other rows (as a hub id or URL can without any local edit)."""
    import logging

    data = jsonl_file(ROWS)
    raw, src = tmp_path / "out" / "raw.parquet", tmp_path / "out" / "source.json"
    download(section(data), str(raw), str(src), offline=True)
    assert json.loads(src.read_text())["changed_since_last_download"] is None
    src.unlink()
    data.write_text(data.read_text() + json.dumps({"instruction": "one more", "output": "row"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="tunesmith.data"):
        download(section(data), str(raw), str(src), offline=True)
    change = json.loads(src.read_text())["changed_since_last_download"]
    assert change["previous_rows"] == 2 and "changed since the download" in caplog.text
