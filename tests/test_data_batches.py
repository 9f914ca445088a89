"""The data stages stream parquet batch by batch (tunesmith.data.batches). With batches of 64 rows
(so every stage sees many), a two-source chain download -> tokenize_count -> filter -> dedupe ->
select -> format gives exactly the rows and reports of the in-memory library functions on the
whole frame; a bad row or a filter that leaves nothing, found in a late batch, leaves no output.
Library level with SmolLM2's tokenizer: a few seconds."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tunesmith.data import batches, dedupe, filters, formatting, load, stages, tokens
from tunesmith.data import select as select_mod
from tunesmith.errors import DataError
from tunesmith.recipe import section_defaults


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    monkeypatch.setattr(batches, "BATCH_ROWS", 64)


def _rows(n, word):
    out = []
    for i in range(n):
        row = {"q": f"{word} question {i % 150} about item {i}", "a": f"The answer to {i} is {'long ' * (i % 40)}{i}."}
        if i % 9 == 4:  # an exact duplicate (case and spaces folded) of the row 3 before
            row = {"q": f"{word.upper()}  QUESTION {(i - 3) % 150} ABOUT ITEM {i - 3}", "a": f"The answer to {i - 3} is "
                   f"{'long ' * ((i - 3) % 40)}{i - 3}."}
        if i % 50 == 7:
            row["a"] = "  "  # empty: filtered
        out.append(row)
    return out


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def chain(tmp_path, data_tokenizer, smollm2_dir):
    cols = {"instruction": "q", "input": None, "output": "a"}
    dataset = section_defaults("dataset", {"sources": [
        {"source": _write(tmp_path / "one.jsonl", _rows(400, "alpha")), "columns": cols},
        {"source": _write(tmp_path / "two.jsonl", _rows(300, "beta")), "columns": cols}]})
    f = {k: str(tmp_path / k) for k in ("raw", "source", "counts", "stats", "hist", "filtered", "freport", "deduped",
                                        "dreport", "dhist", "selected", "sreport", "train", "eval", "preview",
                                        "template", "report")}
    stages.download(dataset, f["raw"], f["source"], offline=True)
    stages.tokenize_count(f["raw"], str(smollm2_dir), section_defaults("tokenize"), f["counts"], f["stats"], f["hist"],
                          tokenizer=data_tokenizer)
    return f


def _report(path):
    return json.loads(open(path).read())


def test_streamed_stages_equal_the_in_memory_functions(chain, data_tokenizer, smollm2_dir):
    f = chain
    frame = load.read_rows(f["raw"])
    assert batches.num_rows(f["raw"]) == 700 and len(list(batches.iter_batches(f["raw"]))) > 10
    counts = tokens.count_frame(frame, data_tokenizer)
    pd.testing.assert_frame_equal(pd.read_parquet(f["counts"]), counts)
    assert _report(f["stats"])["combined"] == tokens.stats(counts)["combined"]

    flt = section_defaults("filter", {"max_tokens": 60})
    m = stages.filter_rows(f["raw"], f["counts"], flt, f["filtered"], f["freport"])
    want, want_report = filters.apply(tokens.attach_counts(frame, counts), flt)
    pd.testing.assert_frame_equal(load.read_rows(f["filtered"]), want)
    got_report = _report(f["freport"])
    assert {k: got_report[k] for k in want_report} == want_report
    assert got_report["rows_by_source"] == stages.by_source(frame, want)
    assert m.metrics["peak_rss_mb"] > 0

    dd = section_defaults("dedupe", {"near": False})
    stages.dedupe(f["filtered"], dd, f["deduped"], f["dreport"], f["dhist"], offline=True)
    want_d, want_dreport, _ = dedupe.run(want, dd, offline=True)
    assert want_dreport["exact_removed"] > 40
    pd.testing.assert_frame_equal(load.read_rows(f["deduped"]), want_d)
    got_dreport = _report(f["dreport"])
    assert {k: got_dreport[k] for k in want_dreport} == want_dreport
    assert got_dreport["rows_by_source"] == stages.by_source(want, want_d)

    for sel in ({"strategy": "top_k", "k": 150}, {"strategy": "random_k", "k": 200, "seed": 3}):
        sel = section_defaults("select", sel)
        stages.select(f["deduped"], sel, f["selected"], f["sreport"])
        want_s, want_sreport = select_mod.apply(want_d, sel)
        pd.testing.assert_frame_equal(load.read_rows(f["selected"]), want_s)
        assert _report(f["sreport"]) == {**want_sreport, "rows_by_source": stages.by_source(want_d, want_s)}

    fmt = section_defaults("format", {"eval_fraction": 0.1})
    m = stages.format_rows(f["selected"], str(smollm2_dir), fmt, f["train"], f["eval"], f["preview"], f["template"],
                           f["report"], tokenizer=data_tokenizer)
    train, evals = formatting.build(want_s, fmt)
    assert formatting.read_split(f["train"]) == train and formatting.read_split(f["eval"]) == evals
    report = _report(f["report"])
    assert report["rows_by_source"] == {name: {"in": int((want_s["source"] == name).sum()),
                                               "train": sum(r["source"] == name for r in train),
                                               "eval": sum(r["source"] == name for r in evals)}
                                        for name in ("one", "two")}
    assert report["rows_eval"] == len(evals) == m.metrics["rows_eval"] and report["rows_train"] == len(train)


def test_a_late_bad_row_leaves_no_raw_parquet(tmp_path):
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(300)]
    rows[250] = {"q": "question 250", "a": 250}
    dataset = section_defaults("dataset", {"source": _write(tmp_path / "d.jsonl", rows),
                                           "columns": {"instruction": "q", "input": None, "output": "a"}})
    raw = tmp_path / "raw.parquet"
    with pytest.raises(DataError, match=r"d.jsonl, line 251, field 'a': expected a string for output, got int"):
        stages.download(dataset, str(raw), str(tmp_path / "source.json"), offline=True)
    assert not raw.exists() and list(tmp_path.glob(".raw.parquet*")) == []
    skipped = dict(dataset, on_bad_rows="skip")
    stages.download(skipped, str(raw), str(tmp_path / "source.json"), offline=True)
    assert load.read_rows(raw)["id"].tolist() == [i for i in range(300) if i != 250]


def test_a_filter_that_empties_the_data_in_the_last_batch_is_named_and_writes_nothing(tmp_path):
    n = 300
    frame = load.to_frame([{"id": i, "instruction": f"q{i}", "input": "", "output": f"a{i}", "system": "",
                            "messages": [], "text": ""} for i in range(n)])
    frame.to_parquet(tmp_path / "raw.parquet")
    # The rows of the last batch are the only short ones: max_tokens leaves none, but only there.
    pd.DataFrame({"id": range(n), "n_instruction_tokens": 1, "n_output_tokens": [50] * 256 + [1] * 44,
                  "n_tokens": [51] * 256 + [2] * 44}).to_parquet(tmp_path / "counts.parquet")
    flt = section_defaults("filter", {"min_tokens": 10, "max_tokens": 20})
    with pytest.raises(DataError, match=r"filter 'max_tokens' removed the last 256 rows, leaving none of 300 \(drops so "
                                        r"far: \{'empty': 0, 'min_tokens': 44, 'max_tokens': 256\}\)"):
        stages.filter_rows(str(tmp_path / "raw.parquet"), str(tmp_path / "counts.parquet"), flt,
                           str(tmp_path / "filtered.parquet"), str(tmp_path / "report.json"))
    assert not any(p.name.startswith(("filtered", ".filtered")) for p in tmp_path.iterdir())
