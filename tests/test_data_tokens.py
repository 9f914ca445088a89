"""tokenize_count: batched counts equal per-row counts; stats; a real histogram PNG."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tunesmith.data import load, tokens
from tunesmith.stages.tokenize_count import tokenize_count
from tunesmith.schema import section_defaults
from workflow_helpers import SHARED


def frame(n=25):
    rows = [{"id": i, "instruction": f"Question {i}: " + "word " * i, "input": "ctx" if i % 2 else "",
             "output": "answer " * (i % 7), "system": "", "messages": [], "text": ""} for i in range(n)]
    return load.to_frame(rows)


def test_batched_counts_match_one_by_one(data_tokenizer):
    f = frame()
    counts = tokens.count_frame(f, data_tokenizer, batch_size=4)
    prompts = tokens.prompt_texts(f)
    expected_in = [len(data_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    expected_out = [len(data_tokenizer(o, add_special_tokens=False)["input_ids"]) for o in f["output"]]
    assert counts["n_instruction_tokens"].tolist() == expected_in
    assert counts["n_output_tokens"].tolist() == expected_out
    assert (counts["n_tokens"] == counts["n_instruction_tokens"] + counts["n_output_tokens"]).all()


def test_counter_from_tokenizer_json_counts_what_transformers_counts(data_tokenizer, smollm2_dir):
    # tokenize_count reads tokenizer.json with the tokenizers library alone (no torch import); the
    # counts must be transformers' own, on real rows with special-token text and unicode in them.
    texts = [json.loads(line)["question"] for line in (SHARED / "data" / "gsm8k" / "test.jsonl").open()][:300] if SHARED.is_dir() \
        else []
    texts += ["<|im_end|> inside a row", "naïve café — ünïcödé", "  leading spaces", "tabs\tand\nnewlines", ""]
    counter = tokens.load_counter(smollm2_dir)
    assert type(counter).__module__.startswith("tokenizers")
    assert tokens.count_tokens(texts, counter).tolist() == tokens.count_tokens(texts, data_tokenizer).tolist()


def test_one_tokenizer_call_per_batch(data_tokenizer):
    calls = []
    rust = tokens.backend(data_tokenizer)

    class Spy:
        def encode_batch_fast(self, texts, add_special_tokens):
            calls.append(len(texts))
            return rust.encode_batch_fast(texts, add_special_tokens=add_special_tokens)

    tokens.count_tokens([f"text {i}" for i in range(10)], Spy(), batch_size=4)
    assert calls == [4, 4, 2]


def test_stats_fields():
    counts = pd.DataFrame({"id": range(5), "n_instruction_tokens": [1, 2, 3, 4, 100],
                           "n_output_tokens": [0, 1, 1, 1, 1], "n_tokens": [1, 3, 4, 5, 101]})
    stats = tokens.stats(counts)
    assert stats["combined"]["min"] == 1 and stats["combined"]["max"] == 101 and stats["combined"]["median"] == 4
    assert stats["instruction"]["p95"] == pytest.approx(np.percentile([1, 2, 3, 4, 100], 95))
    assert set(stats) == {"rows", "instruction", "output", "combined"}


def test_stage_writes_counts_stats_and_png(tmp_path, data_tokenizer, smollm2_dir):
    raw = tmp_path / "raw.parquet"
    frame().to_parquet(raw)
    metrics = tokenize_count(str(raw), str(smollm2_dir), section_defaults("tokenize", {"batch_size": 8}), str(tmp_path / "c.parquet"),
                             str(tmp_path / "s.json"), str(tmp_path / "h.png"), tokenizer=data_tokenizer).metrics
    assert metrics["rows_out"] == 25 and metrics["tokens"] > 0
    stats = json.loads((tmp_path / "s.json").read_text())
    assert {"min", "median", "p95", "max"} <= set(stats["output"])
    png = (tmp_path / "h.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000  # a drawn figure, not an empty canvas
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "h.png").convert("L"))
    assert img.shape[1] > 800 and img.std() > 10


def test_a_saved_tokenizer_that_pads_still_counts_each_text(data_tokenizer, tmp_path):
    """A tokenizer.json saved after padded batch calls pads every batch it encodes: a model merged
    that way once counted every row as long as the longest one."""
    import copy

    from transformers import AutoTokenizer

    from tunesmith.data.tokens import count_tokens, switch_off_padding

    texts = ["Reverse: a, b", "Reverse the order of these words: lamp, ocean, tiger, castle"]
    expected = count_tokens(texts, data_tokenizer).tolist()
    padded = copy.deepcopy(data_tokenizer)
    padded(texts, padding=True)  # switches padding on in the Rust tokenizer
    padded.save_pretrained(tmp_path / "padded")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "padded")
    assert reloaded.backend_tokenizer.padding is not None
    assert count_tokens(texts, reloaded).tolist() == expected
    switch_off_padding(padded)
    padded.save_pretrained(tmp_path / "clean")
    assert AutoTokenizer.from_pretrained(tmp_path / "clean").backend_tokenizer.padding is None
