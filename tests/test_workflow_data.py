"""The data rules of a small test recipe, run through snakemake in a scratch working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.demo import generate

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "resources" / "models" / "smollm2-135m-instruct"

RECIPE = """\
description: data stages only, on 80 generated rows
dataset: {source: data/rows.jsonl, columns: {input: null}}
filter: {min_tokens: 4, max_tokens: 200}
dedupe: {threshold: 0.95}
format: {template: chatml, system_prompt: You reverse word lists., eval_fraction: 0.1, eval_max_rows: 5}
"""


@pytest.mark.slow
def test_data_rules_through_snakemake(tmp_path):
    if not (MODEL / "model.safetensors").is_file():
        pytest.skip("resources/models/smollm2-135m-instruct is not prepared (run the prepare_model rule)")
    work = tmp_path / "work"
    (work / "recipes").mkdir(parents=True)
    (work / "data").mkdir()
    (work / "recipes" / "wf-data.yaml").write_text(RECIPE)
    rows = generate(n=60, seed=3)
    rows.append({"instruction": "", "output": "empty instruction"})
    (work / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "resources" / "models").mkdir(parents=True)
    # The converted base model is reused, so prepare_model has nothing to do.
    (work / "resources" / "models" / MODEL.name).symlink_to(MODEL, target_is_directory=True)
    (work / "config.yaml").write_text("recipes: [wf-data]\nrecipes_dir: recipes\ntracking: {enabled: false}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(work / "config.yaml"), "--cores", "2", "results/wf-data/data/train.jsonl"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = work / "results" / "wf-data" / "data"
    for name in ("raw.parquet", "source.json", "token_counts.parquet", "token_stats.json", "token_hist.png",
                 "filtered.parquet", "filter_report.json", "deduped.parquet", "dedupe_report.json",
                 "dedupe_sim_hist.png", "selected.parquet", "select_report.json", "train.jsonl", "eval.jsonl",
                 "preview.txt", "chat_template.jinja"):
        assert (data / name).is_file(), name
    source = json.loads((data / "source.json").read_text())
    filt = json.loads((data / "filter_report.json").read_text())
    dd = json.loads((data / "dedupe_report.json").read_text())
    assert source["rows"] == len(rows) == filt["rows_in"]
    assert filt["rows_in"] == filt["rows_out"] + sum(filt["drops"].values()) and filt["drops"]["empty"] >= 1
    assert dd["rows_in"] == filt["rows_out"] and dd["exact_removed"] + dd["near_removed"] > 0
    n_train = sum(1 for _ in open(data / "train.jsonl"))
    n_eval = sum(1 for _ in open(data / "eval.jsonl"))
    assert n_train + n_eval == dd["rows_out"] and n_eval == 5
    assert "<|im_start|>assistant" in (data / "preview.txt").read_text()
    for stage in ("download", "tokenize_count", "filter", "dedupe", "select", "format"):
        assert (work / "logs" / "wf-data" / f"{stage}.log").is_file()
        record = json.loads((work / "results" / "wf-data" / "tracking" / f"{stage}.json").read_text())
        assert record["status"] == "FINISHED" and any(m["key"] == "rows_in" or m["key"] == "rows_train"
                                                      for m in record["metrics"])
