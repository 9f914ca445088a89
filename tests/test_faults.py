"""Fault injection through snakemake, as a user meets it: an edited input reruns what reads it, a
bad dataset prints its one-line cause on the terminal of a plain `snakemake` (no profile named),
and nothing stale is used. The table of cases is in docs/reliability.md."""

from __future__ import annotations

import json
import os
import shutil
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


# ---------------------------------------------------------------- the newer stages (issue 27)
# Stage by stage, without snakemake: a corrupt or truncated input names the file; a kill -9 mid-stage
# leaves no declared output a rerun would take as done, and the rerun writes what a clean run writes.

def _sections(**given):
    from tunesmith.schema import fill_defaults, load_schema

    schema = load_schema("recipe")
    return {name: fill_defaults(given.get(name, {}), schema["properties"][name], schema) for name in
            ("dataset", "tokenize", "filter", "decontaminate", "evaluate", "format", "publish")}


def _cut(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, smollm2_dir, data_tokenizer):
    """raw.parquet of 600 generated rows and the token counts of its 2 shards (shard jobs' outputs)."""
    from tunesmith.stages import download, tokenize_shard

    folder = tmp_path_factory.mktemp("sharded")
    rows = folder / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in generate(n=600, seed=7)))
    sections = _sections(dataset={"source": str(rows), "columns": {"input": None}, "shards": 2})
    raw = folder / "raw.parquet"
    download.download(sections["dataset"], str(raw), str(folder / "source.json"), offline=True)
    counts = []
    for shard in range(2):
        out = folder / "token_counts" / f"{shard}-of-2.parquet"
        tokenize_shard.tokenize_shard(str(raw), str(smollm2_dir), sections["tokenize"], shard, 2, str(out),
                                      tokenizer=data_tokenizer)
        counts.append(out)
    return {"folder": folder, "raw": raw, "counts": counts, "sections": sections}


def test_a_truncated_shard_names_the_file(sharded, tmp_path):
    """Before: pyarrow's 'Parquet magic bytes not found in footer', naming no file."""
    from tunesmith.errors import DataError
    from tunesmith.stages import filter_shard, tokenize_count

    cut = _cut(Path(shutil.copy(sharded["counts"][1], tmp_path / "1-of-2.parquet")))
    with pytest.raises(DataError, match=rf"{cut}: not a readable parquet file .*re-run the job that wrote it"):
        tokenize_count.tokenize_count(str(sharded["raw"]), "", sharded["sections"]["tokenize"],
                                      str(tmp_path / "c.parquet"), str(tmp_path / "s.json"), str(tmp_path / "h.png"),
                                      shards=[str(sharded["counts"][0]), str(cut)])
    with pytest.raises(DataError, match=rf"{cut}: not a readable parquet file"):
        filter_shard.filter_shard(str(sharded["raw"]), str(cut), sharded["sections"]["filter"], 1, 2,
                                  str(tmp_path / "f.parquet"), str(tmp_path / "f.json"), str(tmp_path / "f.npz"))
    assert not list(tmp_path.glob("f.*")) and not (tmp_path / "c.parquet").exists()


def test_a_truncated_task_file_names_the_file(tmp_path):
    """decontaminate reads each eval task's documents: cut short, the file is named (before: a
    .parquet or .json one failed with pyarrow's or json's message alone)."""
    import pandas as pd

    from tunesmith.data.contamination import read_documents
    from tunesmith.errors import DataError

    docs = [{"question": f"How many apples are in basket {i}?", "answer": str(i)} for i in range(50)]
    jsonl = tmp_path / "task.jsonl"
    jsonl.write_text("".join(json.dumps(d) + "\n" for d in docs))
    _cut(jsonl, 0.7)
    with pytest.raises(DataError, match=rf"{jsonl}, line \d+: not valid JSON"):
        read_documents(jsonl, "t")
    parquet = tmp_path / "task.parquet"
    pd.DataFrame(docs).to_parquet(parquet)
    _cut(parquet)
    with pytest.raises(DataError, match=rf"{parquet}: not a readable parquet file"):
        read_documents(parquet, "t")
    js = tmp_path / "task.json"
    js.write_text(json.dumps(docs))
    _cut(js)
    with pytest.raises(DataError, match=rf"{js}: not valid JSON"):
        read_documents(js, "t")


def test_a_truncated_pairs_file_names_file_and_line(tmp_path):
    """dpo/kto read results/<recipe>/data/pairs.jsonl (curate_pairs' output); cut mid-row."""
    from tunesmith.errors import DataError
    from tunesmith.objectives import dpo

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"q{i}"}],
                                         "chosen": [{"role": "assistant", "content": "yes"}],
                                         "rejected": [{"role": "assistant", "content": "no"}]}) + "\n"
                             for i in range(6)))
    _cut(pairs, 0.9)
    with pytest.raises(DataError, match=rf"{pairs}, line 6: not valid JSON"):
        dpo.read_rows(str(pairs), "dpo")


def test_a_missing_upstream_model_folder_is_named(tmp_path):
    """A chained recipe's base is the upstream recipe's merged folder (results/<up>/main/model/merged).
    Before: gone or emptied, transformers called the path an invalid hub repo id."""
    from conftest import train_section

    from tunesmith import training
    from tunesmith.errors import TunesmithError

    merged = tmp_path / "results" / "up" / "main" / "model" / "merged"
    with pytest.raises(TunesmithError, match=rf"{merged}: the base model folder is missing: the merged model of "
                                             r"the recipe this one chains on"):
        training.setup(str(merged), None, train_section())
    merged.mkdir(parents=True)
    (merged / "model.safetensors").write_bytes(b"")
    with pytest.raises(TunesmithError, match=rf"{merged}: not a model folder \(no config.json\)"):
        training.setup(str(merged), None, train_section())


# A stage run by hand as the rules run it (scripts/stage.py), that stops itself (SIGSTOP) at a chosen
# point inside the stage so that the test's SIGKILL lands there, not at a random time.
_STOPPING = """\
import os, runpy, signal, sys
module, attr, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
import importlib
owner = importlib.import_module(module)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
original, calls = getattr(owner, name), []
def stop_then_call(*args, **kwargs):
    calls.append(1)
    if len(calls) == nth:
        os.kill(os.getpid(), signal.SIGSTOP)
    return original(*args, **kwargs)
setattr(owner, name, stop_then_call)
sys.argv = ["scripts/stage.py", *sys.argv[4:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _kill_at(stop_at: tuple[str, str, int], argv: list[str], cwd: Path) -> None:
    """Run scripts/stage.py <argv> until it stops at stop_at (module, attribute, nth call), then kill -9."""
    import signal

    env = {**os.environ, "PYTHONPATH": str(REPO), "TUNESMITH_TRACKING": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _STOPPING, *map(str, stop_at), *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the stage ended before the fault point: {proc.stdout.read()[-3000:]}")
        with open(f"/proc/{proc.pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "T":  # stopped where the test wants it
                break
        time.sleep(0.05)
    else:
        proc.kill()
        raise AssertionError("the stage never reached the fault point")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _stage_argv(rule: str, inputs: dict, outputs: dict, params: dict, folder: Path, **wildcards) -> list[str]:
    params_file = folder / f"{rule}.params.json"
    params_file.write_text(json.dumps(params))
    argv = [rule, "--params", str(params_file)]
    for flag, pairs in (("--input", inputs), ("--output", outputs), ("--wildcard", wildcards)):
        argv += [arg for k, v in pairs.items() for arg in (flag, f"{k}={v}")]
    return argv


def test_kill_9_in_a_shard_job_leaves_nothing_taken_as_done(sharded, tmp_path):
    """filter_shard killed after it wrote its report and digests but before its rows are in place:
    its declared outputs are not all there (Snakemake reruns the job), no half file sits under an
    output's name, and the rerun writes what a clean run writes."""
    import pyarrow.parquet as pq

    def run_args(folder: Path) -> tuple[list[str], dict]:
        outputs = {"filtered": folder / "1-of-2.parquet", "report": folder / "1-of-2.report.json",
                   "digests": folder / "1-of-2.digests.npz"}
        return _stage_argv("filter_shard", {"raw": sharded["raw"], "counts": sharded["counts"][1]}, outputs,
                           {"section": {"filter": sharded["sections"]["filter"]}}, folder, shard=2, shards=2), outputs

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir(), killed.mkdir()
    argv, outputs = run_args(killed)
    _kill_at(("tunesmith.data.batches", "ParquetSink.__exit__", 1), argv, killed)
    assert not outputs["filtered"].exists()  # rows were written to a temp name only
    assert not all(p.exists() for p in outputs.values())
    for leftover in killed.iterdir():
        assert leftover.name.startswith(".") or leftover in outputs.values() or leftover.suffix == ".json", leftover

    subprocess.run([sys.executable, str(REPO / "scripts/stage.py"), *argv], cwd=REPO, check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    clean_argv, clean_out = run_args(clean)
    subprocess.run([sys.executable, str(REPO / "scripts/stage.py"), *clean_argv], cwd=REPO, check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    assert pq.read_table(outputs["filtered"]).equals(pq.read_table(clean_out["filtered"]))
    assert json.loads(outputs["report"].read_text()) == json.loads(clean_out["report"].read_text())
    import numpy as np

    with np.load(outputs["digests"]) as a, np.load(clean_out["digests"]) as b:
        assert (a["digests"] == b["digests"]).all()


def test_kill_9_in_the_cards_stage_leaves_no_cards_folder(tmp_path):
    """cards killed after its first card is written: no cards/ folder (the declared output) appears,
    an older one is not left half replaced, and the rerun writes a clean run's cards."""
    adapter, merged, gguf = tmp_path / "model/trained", tmp_path / "model/merged", tmp_path / "gguf"
    for folder in (adapter, merged, gguf):
        folder.mkdir(parents=True)
    (merged / "README.md").write_text("---\nbase_model: b\n---\n\n# demo\n")
    (merged / "tunesmith_lineage.json").write_text(json.dumps([{"recipe": "demo", "base": "resources/models/b"}]))
    compare = tmp_path / "compare.json"
    compare.write_text(json.dumps({"tasks": {"heldout": {"base": 0.1, "tuned": 0.9, "metric": "exact_match,none"}}}))
    params = {"section": {"publish": {**_sections()["publish"], "license": "apache-2.0"}}, "dataset_source": None}
    inputs = {"adapter": adapter, "merged": merged, "gguf": gguf, "compare": compare}

    def argv(out: Path) -> list[str]:
        return _stage_argv("cards", inputs, {"cards": out}, params, tmp_path) + ["--recipe", "demo"]

    killed, clean = tmp_path / "killed/cards", tmp_path / "clean/cards"
    _kill_at(("tunesmith.publishing", "card", 2), argv(killed), tmp_path)
    assert not killed.exists()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TUNESMITH_TRACKING": "0"}
    for out in (killed, clean):
        subprocess.run([sys.executable, str(REPO / "scripts/stage.py"), *argv(out)], cwd=tmp_path, check=True,
                       timeout=300, env=env, capture_output=True)
    assert sorted(p.name for p in killed.iterdir()) == ["adapter.md", "gguf.md", "merged.md"]
    for name in ("adapter.md", "gguf.md", "merged.md"):
        assert (killed / name).read_text() == (clean / name).read_text()
    # Killed again while replacing a finished folder: the old cards stay whole until the new are in place.
    _kill_at(("tunesmith.publishing", "card", 3), argv(killed), tmp_path)
    assert sorted(p.name for p in killed.iterdir()) == ["adapter.md", "gguf.md", "merged.md"]
