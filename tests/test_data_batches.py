"""The data stages stream parquet batch by batch (tunesmith.data.batches). With batches of 64 rows
(so every stage sees many), a two-source chain download -> tokenize_count -> filter -> dedupe ->
select -> format gives exactly the rows and reports of the in-memory library functions on the
whole frame; a bad row or a filter that leaves nothing, found in a late batch, leaves no output.
Library level with SmolLM2's tokenizer: a few seconds."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tunesmith.data import accounting, batches, duplicates, filters, formatting, load, tokens
from tunesmith.stages import dedupe as dedupe_stage, download as download_stage, filter as filter_stage, filter_shard as filter_shard_stage, format as format_stage, select as select_stage, tokenize_count as tokenize_count_stage, tokenize_shard as tokenize_shard_stage
from tunesmith.data import selection as select_mod
from tunesmith.errors import DataError
from tunesmith.schema import section_defaults


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
    download_stage.download(dataset, f["raw"], f["source"], offline=True)
    tokenize_count_stage.tokenize_count(f["raw"], str(smollm2_dir), section_defaults("tokenize"), f["counts"], f["stats"], f["hist"],
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
    m = filter_stage.filter_rows(f["raw"], f["counts"], flt, f["filtered"], f["freport"])
    want, want_report = filters.apply(tokens.attach_counts(frame, counts), flt)
    pd.testing.assert_frame_equal(load.read_rows(f["filtered"]), want)
    got_report = _report(f["freport"])
    assert {k: got_report[k] for k in want_report} == want_report
    assert got_report["rows_by_source"] == accounting.by_source(frame, want)
    assert m.metrics["peak_rss_mb"] > 0

    dd = section_defaults("dedupe", {"near": False})
    dedupe_stage.dedupe(f["filtered"], dd, f["deduped"], f["dreport"], f["dhist"], offline=True)
    want_d, want_dreport, _ = duplicates.run(want, dd, offline=True)
    assert want_dreport["exact_removed"] > 40
    pd.testing.assert_frame_equal(load.read_rows(f["deduped"]), want_d)
    got_dreport = _report(f["dreport"])
    assert {k: got_dreport[k] for k in want_dreport} == want_dreport
    assert got_dreport["rows_by_source"] == accounting.by_source(want, want_d)

    for sel in ({"strategy": "top_k", "k": 150}, {"strategy": "random_k", "k": 200, "seed": 3}):
        sel = section_defaults("select", sel)
        select_stage.select(f["deduped"], sel, f["selected"], f["sreport"])
        want_s, want_sreport = select_mod.apply(want_d, sel)
        pd.testing.assert_frame_equal(load.read_rows(f["selected"]), want_s)
        assert _report(f["sreport"]) == {**want_sreport, "rows_by_source": accounting.by_source(want_d, want_s)}

    fmt = section_defaults("format", {"eval_fraction": 0.1})
    m = format_stage.format_rows(f["selected"], str(smollm2_dir), fmt, f["train"], f["eval"], f["preview"], f["template"],
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
        download_stage.download(dataset, str(raw), str(tmp_path / "source.json"), offline=True)
    assert not raw.exists() and list(tmp_path.glob(".raw.parquet*")) == []
    skipped = dict(dataset, on_bad_rows="skip")
    download_stage.download(skipped, str(raw), str(tmp_path / "source.json"), offline=True)
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
        filter_stage.filter_rows(str(tmp_path / "raw.parquet"), str(tmp_path / "counts.parquet"), flt,
                           str(tmp_path / "filtered.parquet"), str(tmp_path / "report.json"))
    assert not any(p.name.startswith(("filtered", ".filtered")) for p in tmp_path.iterdir())


def test_four_shards_of_a_mixture_give_the_unsharded_counts_report_and_rows(chain, data_tokenizer, smollm2_dir,
                                                                             tmp_path):
    """dataset.shards: 4 on the two-source chain (64-row batches): tokenize_shard and filter_shard jobs
    gathered by tokenize_count and filter, and exact dedupe on the shards' digests, give the counts,
    the filter report (rows per source included) and the rows of the unsharded stages."""
    import pyarrow.parquet as pq

    f = chain

    def shard_files(suffix):
        return [str(tmp_path / "shards" / f"{i + 1}-of-4{suffix}") for i in range(4)]

    counts = shard_files(".parquet")
    for i, path in enumerate(counts):
        tokenize_shard_stage.tokenize_shard(f["raw"], str(smollm2_dir), section_defaults("tokenize"), i, 4, path,
                              tokenizer=data_tokenizer)
    g = {k: str(tmp_path / "gathered" / k) for k in ("counts", "stats", "hist", "filtered", "freport", "deduped", "dreport",
                                                   "dhist")}  # the chain fixture's files lie in tmp_path
    tokenize_count_stage.tokenize_count(f["raw"], str(smollm2_dir), section_defaults("tokenize"), g["counts"], g["stats"], g["hist"],
                          shards=counts)
    assert pq.read_table(f["counts"]).equals(pq.read_table(g["counts"]))
    flt = section_defaults("filter", {"max_tokens": 60})
    filter_stage.filter_rows(f["raw"], f["counts"], flt, f["filtered"], f["freport"])
    parts, reports, digests = (shard_files(s) for s in (".rows.parquet", ".report.json", ".digests.npz"))
    for i in range(4):
        filter_shard_stage.filter_shard(f["raw"], counts[i], flt, i, 4, parts[i], reports[i], digests[i])
    m = filter_stage.gather_filtered(f["raw"], g["counts"], parts, reports, flt, g["filtered"], g["freport"])
    assert open(f["freport"], "rb").read() == open(g["freport"], "rb").read()
    assert set(_report(g["freport"])["rows_by_source"]) == {"one", "two"} and m.metrics["shards"] == 4
    assert pq.read_table(f["filtered"]).equals(pq.read_table(g["filtered"]))
    dd = section_defaults("dedupe", {"near": False})
    dedupe_stage.dedupe(f["filtered"], dd, f["deduped"], f["dreport"], f["dhist"], offline=True)
    dedupe_stage.dedupe(g["filtered"], dd, g["deduped"], g["dreport"], g["dhist"], offline=True, digests=digests)
    assert pq.read_table(f["deduped"]).equals(pq.read_table(g["deduped"]))
    assert _report(f["dreport"])["exact_removed"] > 40
    assert {k: v for k, v in _report(g["dreport"]).items() if k != "digest_shards"} == _report(f["dreport"])


def test_a_shard_may_lose_every_row_but_the_data_may_not(tmp_path):
    """filter_shard: a shard whose rows all fail a rule is an empty part; the gather checks "a rule left
    no rows" over every shard and, when it did, names the rule as the unsharded filter does."""
    n = 300
    frame = load.to_frame([{"id": i, "instruction": f"q{i}", "input": "", "output": f"a{i}", "system": "",
                            "messages": [], "text": ""} for i in range(n)])
    raw = str(tmp_path / "raw.parquet")
    frame.to_parquet(raw)
    n_out = [50] * 256 + [1] * 44  # the last shard (rows 225..300) holds the 44 short rows
    counts = []
    for i in range(4):
        start, stop = batches.shard_bounds(n, 4, i)
        counts.append(str(tmp_path / f"c{i + 1}-of-4.parquet"))
        with batches.ParquetSink(counts[-1], tokens.counts_schema(), metadata=batches.shard_metadata(start, stop, n)) as sink:
            sink.write(pd.DataFrame({"id": range(start, stop), "n_instruction_tokens": 1,
                                     "n_output_tokens": n_out[start:stop],
                                     "n_tokens": [c + 1 for c in n_out[start:stop]]}))
    pd.concat([pd.read_parquet(c) for c in counts]).to_parquet(tmp_path / "counts.parquet")

    def run(flt, name):
        paths = [[str(tmp_path / name / f"{i + 1}-of-4{s}") for i in range(4)]
                 for s in (".parquet", ".report.json", ".digests.npz")]
        for i in range(4):
            filter_shard_stage.filter_shard(raw, counts[i], flt, i, 4, paths[0][i], paths[1][i], paths[2][i])
        out = tmp_path / name / "filtered.parquet"
        filter_stage.gather_filtered(raw, str(tmp_path / "counts.parquet"), paths[0], paths[1], flt, str(out),
                               str(tmp_path / name / "report.json"))
        return out, paths

    out, paths = run(section_defaults("filter", {"max_tokens": 20}), "some")
    assert [batches.num_rows(p) for p in paths[0]] == [0, 0, 0, 44]
    assert load.read_rows(out)["id"].tolist() == list(range(256, 300))
    with pytest.raises(DataError, match=r"filter 'max_tokens' removed the last 256 rows, leaving none of 300 \(drops so "
                                        r"far: \{'empty': 0, 'min_tokens': 44, 'max_tokens': 256\}\)"):
        run(section_defaults("filter", {"min_tokens": 10, "max_tokens": 20}), "none")
    assert not (tmp_path / "none" / "filtered.parquet").exists()


def test_a_shard_script_runs_by_hand_with_its_wildcards(tmp_path, smollm2_dir):
    """The tokenize_shard stage outside Snakemake (scripts/stage.py tokenize_shard): its place comes as --wildcard shard=2 --wildcard
    shards=3; without them it stops with one line naming what it needs."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    raw = tmp_path / "raw.parquet"
    load.to_frame([{"id": i, "instruction": f"question {i}", "input": "", "output": f"answer {i}", "system": "",
                    "messages": [], "text": ""} for i in range(10)]).to_parquet(raw)
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"section": {"tokenize": section_defaults("tokenize")}}))
    out = tmp_path / "counts" / "2-of-3.parquet"
    cmd = [sys.executable, str(repo / "scripts" / "stage.py"), "tokenize_shard", f"--input=raw={raw}",
           f"--input=tokenizer={smollm2_dir}", f"--output=counts={out}", f"--params={params}"]
    env = {**__import__("os").environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run([*cmd, "--wildcard=shard=2", "--wildcard=shards=3"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "shard 2/3: 3 rows counted" in proc.stdout
    assert batches.file_metadata(out) | {"count_seconds": "-"} == {"shard_start": "3", "shard_stop": "6",
                                                                    "shard_total": "10", "count_seconds": "-"}
    assert pd.read_parquet(out)["id"].tolist() == [3, 4, 5]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "tokenize_shard is one shard of dataset.shards: it needs the wildcards shard and " \
        "shards (by hand: --wildcard shard=1 --wildcard shards=4)" in proc.stdout + proc.stderr, proc.stderr[-2000:]
