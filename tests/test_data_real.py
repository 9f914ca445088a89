"""The data stages on real third-party data from ../shared/data (skipped when it is absent):
GSM8K train, GPTeacher toolformer, ShareGPT dummy conversations."""

from __future__ import annotations

import json

import pytest

from tunesmith.stages import dedupe as dedupe_stage, download as download_stage, filter as filter_stage, format as format_stage, tokenize_count as tokenize_count_stage
from tunesmith.schema import section_defaults


def run_until_filter(tmp_path, dataset, smollm2_dir, tokenizer, filter_section):
    d = {k: str(tmp_path / v) for k, v in [("raw", "raw.parquet"), ("source", "source.json"), ("counts", "c.parquet"),
                                           ("stats", "s.json"), ("hist", "h.png"), ("filtered", "f.parquet"),
                                           ("report", "filter_report.json")]}
    download_stage.download(dataset, d["raw"], d["source"], offline=True)
    tokenize_count_stage.tokenize_count(d["raw"], str(smollm2_dir), section_defaults("tokenize"), d["counts"], d["stats"], d["hist"],
                          tokenizer=tokenizer)
    filter_stage.filter_rows(d["raw"], d["counts"], filter_section, d["filtered"], d["report"])
    return d


def test_toolformer_reports_add_up(tmp_path, shared_data, data_tokenizer, smollm2_dir, recipe_sections):
    s = recipe_sections(dataset={"source": str(shared_data / "gpteacher/toolformer-dedupe-only.json"),
                                 "columns": {"output": "response"}},
                        filter={"max_tokens": 200, "min_tokens": 8,
                                "regex": [{"name": "no_tool_call", "field": "output", "pattern": r"\w+\(", "action": "keep"}]})
    d = run_until_filter(tmp_path, s["dataset"], smollm2_dir, data_tokenizer, s["filter"])
    source = json.loads(open(d["source"]).read())
    report = json.loads(open(d["report"]).read())
    stats = json.loads(open(d["stats"]).read())
    assert source["rows"] == source["records_read"] == 7673 and source["skipped"]["count"] == 0
    assert stats["rows"] == 7673 and stats["combined"]["max"] > stats["combined"]["p95"] > stats["combined"]["median"]
    assert report["rows_in"] == 7673
    assert report["rows_in"] == report["rows_out"] + sum(report["drops"].values())
    assert report["drops"]["max_tokens"] > 0 and report["drops"]["regex:no_tool_call"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("threshold", [0.9, 0.8])
def test_toolformer_near_dedupe(tmp_path, shared_data, embedder, recipe_sections, threshold):
    s = recipe_sections(dataset={"source": str(shared_data / "gpteacher/toolformer-dedupe-only.json"),
                                 "columns": {"output": "response"}, "limit": 400},
                        dedupe={"threshold": threshold, "sample_pairs": 20})
    download_stage.download(s["dataset"], str(tmp_path / "raw.parquet"), str(tmp_path / "src.json"), offline=True)
    from tunesmith.data import load

    frame = load.read_rows(tmp_path / "raw.parquet").assign(n_instruction_tokens=1, n_output_tokens=1, n_tokens=2)
    frame.to_parquet(tmp_path / "f.parquet")
    dedupe_stage.dedupe(str(tmp_path / "f.parquet"), s["dedupe"], str(tmp_path / "d.parquet"), str(tmp_path / "r.json"),
                  str(tmp_path / "h.png"), offline=True, model=embedder)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["near_removed"] > 0 and report["pairs_sample"]
    assert all(p["similarity"] >= threshold for p in report["pairs_sample"])
    assert report["rows_in"] == 400 == report["rows_out"] + report["exact_removed"] + report["near_removed"]
    (tmp_path.parent / f"near-{threshold}.txt").write_text(str(report["near_removed"]))
    if threshold == 0.8:  # a lower threshold removes at least as much (same rows, same order)
        higher = tmp_path.parent / "near-0.9.txt"
        if higher.exists():
            assert report["near_removed"] >= int(higher.read_text())


def test_gsm8k_train_to_alpaca_conversations(tmp_path, shared_data, data_tokenizer, smollm2_dir, recipe_sections):
    s = recipe_sections(dataset={"source": str(shared_data / "gsm8k/train.jsonl"),
                                 "columns": {"instruction": "question", "output": "answer", "input": None}},
                        format={"template": "alpaca", "eval_fraction": 0.05, "eval_max_rows": 100})
    d = run_until_filter(tmp_path, s["dataset"], smollm2_dir, data_tokenizer, s["filter"])
    report = json.loads(open(d["report"]).read())
    assert report["rows_in"] == 7473 == report["rows_out"] + sum(report["drops"].values())
    m = format_stage.format_rows(d["filtered"], str(smollm2_dir), s["format"], str(tmp_path / "train.jsonl"),
                           str(tmp_path / "eval.jsonl"), str(tmp_path / "preview.txt"), str(tmp_path / "t.jinja"),
                           str(tmp_path / "format_report.json"), tokenizer=data_tokenizer).metrics
    assert m["rows_eval"] == 100 and m["rows_train"] == report["rows_out"] - 100
    first = json.loads(open(tmp_path / "eval.jsonl").readline())
    assert "####" in first["answer"]
    assert "### Instruction:\n" in (tmp_path / "preview.txt").read_text()


def test_sharegpt_multi_turn(tmp_path, shared_data, data_tokenizer, smollm2_dir, recipe_sections):
    s = recipe_sections(dataset={"source": str(shared_data / "sharegpt/dummy_conversation.json"),
                                 "schema": "messages", "columns": {"messages": "conversations"}})
    d = run_until_filter(tmp_path, s["dataset"], smollm2_dir, data_tokenizer, s["filter"])
    assert json.loads(open(d["source"]).read())["rows"] == 500
    m = format_stage.format_rows(d["filtered"], str(smollm2_dir), s["format"], str(tmp_path / "train.jsonl"),
                           str(tmp_path / "eval.jsonl"), str(tmp_path / "preview.txt"), str(tmp_path / "t.jinja"),
                           str(tmp_path / "format_report.json"), tokenizer=data_tokenizer).metrics
    assert m["multi_turn_rows"] > 0
    rows = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
    multi = next(r for r in rows if len(r["prompt"]) > 1)
    assert [x["role"] for x in multi["prompt"]][:3] == ["user", "assistant", "user"]
    assert multi["completion"][0]["role"] == "assistant"
