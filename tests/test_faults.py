"""Fault injection through snakemake, as a user meets it: an edited input reruns what reads it, a
bad dataset prints its one-line cause on the terminal of a plain `snakemake` (no profile named),
and nothing stale is used. The table of cases is in docs/reliability.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunesmith.demo import generate

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")

RECIPE = """\
description: fault injection on 30 generated rows
dataset: {source: data/rows.jsonl, columns: {input: null}}
dedupe: {near: false}
format: {template: custom, custom_template: data/template.jinja, eval_fraction: 0.1, eval_max_rows: 3}
"""
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def work(tmp_path, smollm2_dir):
    work = tmp_path / "work"
    for sub in ("recipes", "data", "resources/models"):
        (work / sub).mkdir(parents=True)
    (work / "recipes" / "faults.yaml").write_text(RECIPE)
    (work / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in generate(n=30, seed=5)))
    (work / "data" / "template.jinja").write_text(TEMPLATE)
    (work / "resources" / "models" / smollm2_dir.name).symlink_to(smollm2_dir, target_is_directory=True)
    (work / "config.yaml").write_text("recipes: [faults]\ntracking: {enabled: false}\n")
    return work


def _snakemake(work: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("TUNESMITH_INVOCATION", None)
    # The plain command of the README: no --workflow-profile (profiles/default applies).
    cmd = [SNAKEMAKE, *args, "--snakefile", str(REPO / "Snakefile"), "--directory", str(work), "--cores", "2"]
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=900, env=env)


def _planned(proc: subprocess.CompletedProcess) -> set[str]:
    return {line.split()[1].rstrip(":") for line in proc.stdout.splitlines() if line.startswith("rule ")}


def _touch_later(path: Path, text: str) -> None:
    time.sleep(1.1)  # mtime granularity: the edit must be newer than the outputs
    path.write_text(text)


@pytest.mark.slow
def test_edited_inputs_rerun_what_reads_them_and_bad_rows_reach_the_terminal(work):
    target = "results/faults/data/train.jsonl"
    proc = _snakemake(work, target)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "format: " in proc.stdout + proc.stderr  # the stage's one-line summary on the terminal
    for stage in ("download", "tokenize_count", "filter", "dedupe", "select", "format"):
        # tracking is off: the record file is still written, for sync-mlflow later
        record = json.loads((work / "results/faults/tracking" / f"{stage}.json").read_text())
        assert record["status"] == "FINISHED" and record["synced"] is False, stage
        assert any(m["key"] == "rows_out" for m in record["metrics"]), stage
    assert _planned(_snakemake(work, target, "-n")) == set()

    # 1. Rows appended to the dataset file: download and everything after it rerun.
    rows = work / "data" / "rows.jsonl"
    n = len(rows.read_text().splitlines())
    _touch_later(rows, rows.read_text() + json.dumps({"instruction": "Reverse: a, b", "output": "b, a"}) + "\n")
    assert {"download", "tokenize_count", "filter", "dedupe", "select", "format"} <= _planned(
        _snakemake(work, target, "-n"))
    proc = _snakemake(work, target)
    assert proc.returncode == 0
    assert json.loads((work / "results/faults/data/source.json").read_text())["rows"] == n + 1

    # 2. The custom chat template edited: format reruns, the data stages before it do not.
    tmpl = work / "data" / "template.jinja"
    _touch_later(tmpl, tmpl.read_text().replace("<|im_start|>{{ m['role'] }}\n", "<|im_start|>{{ m['role'] }}\n\n"))
    assert _planned(_snakemake(work, target, "-n")) == {"format"}
    assert _snakemake(work, target).returncode == 0
    assert "\n\n" in (work / "results/faults/data/chat_template.jinja").read_text()

    # 3. A malformed row: plain snakemake prints the cause (file, row) and the log on the terminal,
    #    no traceback, and the old outputs are not taken as done.
    _touch_later(rows, rows.read_text() + '{"instruction": "broken", "output": \n')
    proc = _snakemake(work, target)
    assert proc.returncode != 0
    terminal = proc.stdout + proc.stderr
    assert "tunesmith error:" in terminal and "rows.jsonl" in terminal and f"line {n + 2}" in terminal, terminal[-3000:]
    assert "logs/faults/download.log" in terminal
    assert "Traceback" not in terminal
    assert "download" in _planned(_snakemake(work, target, "-n"))


def test_every_local_file_a_stage_reads_is_an_input_of_its_rule(tmp_path, tiny_llama_dir):
    """The corpus, the lm-eval task's data file and a local model folder are inputs of the rules that
    read them (so an edit reruns them, as the dataset and template cases above show for real)."""
    import yaml

    shared = REPO.parent / "shared"
    if not (shared / "data" / "gsm8k" / "test.jsonl").is_file():
        pytest.skip("real datasets not available")
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(shared)
    (work / "data").symlink_to(REPO / "data")
    cfg = yaml.safe_load((REPO / "tests" / "configs" / "cpu.yaml").read_text())
    cfg["recipes_dir"] = str(REPO / "recipes")
    cfg["overrides"]["gsm8k-smollm2-lora"]["model"] = {"base": str(tiny_llama_dir)}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = _snakemake(work, "-n")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    jobs = {}
    for block in proc.stdout.split("\nrule ")[1:]:
        name, body = block.split(":", 1)
        jobs.setdefault(name.strip(), []).append(body.split("\n    output:")[0])
    assert any("../shared/data/gsm8k/test.jsonl" in b for b in jobs["evaluate_base"])
    assert any("../shared/data/gsm8k/test.jsonl" in b for b in jobs["evaluate"])
    corpus = yaml.safe_load((REPO / "recipes" / "scratch-llama.yaml").read_text())["pretrain"]["corpus"]["source"]
    assert any(corpus in b for b in jobs["train_tokenizer"]) and any(corpus in b for b in jobs["pretrain"])
    assert any(str(tiny_llama_dir) in b for b in jobs["prepare_model"])
