"""Data-preparation benchmark: prints figures from ONE run (no repeats, no averaging).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/data_prep.py [--shared ../shared/data] [--skip-stages]

1. Token counting on GPTeacher toolformer (7,673 rows) and GSM8K train (7,473 rows):
   - the tokenize_count stage's counting function (tunesmith.data.tokens.count_frame),
   - the seeds' approach: iterate rows, tokenizer.tokenize() once per field,
   - the raw ceiling: one batched fast-tokenizer call over each column,
   and the stage's ratios to each (target: >= 0.8x the ceiling).
2. Every data stage run by hand as its own process (scripts/stage.py <rule>, MLflow off) on the
   toolformer set: wall time split into start-up (interpreter + imports before the stage body,
   plus tokenizer / embedding-model load) and work.
3. Dedupe embedding rows/s against a bare SentenceTransformer.encode of the same texts, and
   the faiss search time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MODEL = REPO / "resources" / "models" / "smollm2-135m-instruct"
DATASETS = {
    "toolformer": ("gpteacher/toolformer-dedupe-only.json",
                   {"instruction": "instruction", "input": "input", "output": "response"}),
    "gsm8k-train": ("gsm8k/train.jsonl", {"instruction": "question", "input": None, "output": "answer"}),
}


def dataset_section(shared: Path, name: str) -> dict:
    from tunesmith.schema import section_defaults

    path, cols = DATASETS[name]
    return section_defaults("dataset", {"source": str(shared / path), "columns": dict(cols)})


def bench_counting(shared: Path, tok) -> None:
    from tunesmith.data import load, tokens

    print("== token counting (SmolLM2 tokenizer; one run each) ==")
    print(f"{'dataset':<12} {'method':<34} {'rows':>6} {'tokens':>9} {'sec':>7} {'rows/s':>9} {'tokens/s':>11}")
    for name in DATASETS:
        frame = load.load(dataset_section(shared, name), offline=True).frame
        prompts, outputs = tokens.prompt_texts(frame), frame["output"].tolist()

        t = time.perf_counter()
        counts = tokens.count_frame(frame, tok, batch_size=1000)
        stage_s = time.perf_counter() - t
        n_tokens = int(counts["n_tokens"].sum())

        t = time.perf_counter()
        seed_total = 0
        for p, o in zip(prompts, outputs):  # the seeds' loop: one Python call per field per row
            seed_total += len(tok.tokenize(p)) + len(tok.tokenize(o))
        seed_s = time.perf_counter() - t

        t = time.perf_counter()
        ceiling_total = sum(len(ids) for col in (prompts, outputs)
                            for ids in tok(col, add_special_tokens=False)["input_ids"])
        ceiling_s = time.perf_counter() - t

        rows = len(frame)
        for label, secs, total in (("stage (count_frame, batches of 1000)", stage_s, n_tokens),
                                   ("seed loop (tokenize per field)", seed_s, seed_total),
                                   ("ceiling (one call per column)", ceiling_s, ceiling_total)):
            print(f"{name:<12} {label:<34} {rows:>6} {total:>9} {secs:>7.3f} {rows / secs:>9.0f} {total / secs:>11.0f}")
        same = "equal" if n_tokens == ceiling_total else f"DIFFER ({n_tokens} vs {ceiling_total})"
        print(f"{name:<12} stage / seed loop: {seed_s / stage_s:.2f}x faster; stage / ceiling: "
              f"{ceiling_s / stage_s:.2f}x of the ceiling's speed (target >= 0.8); token totals stage vs ceiling: {same}"
              f"; seed loop total {seed_total}")


def run_stage(script: str, inputs: dict, outputs: dict, params: dict, work: Path) -> dict:
    pfile = work / f"{script}.params.json"
    pfile.write_text(json.dumps(params))
    cmd = [sys.executable, str(REPO / "scripts" / "stage.py"), "select" if script == "select_rows" else script,
           "--params", str(pfile),
           "--log", str(work / "logs" / f"{script}.log")]
    cmd += [a for k, v in inputs.items() for a in ("--input", f"{k}={v}")]
    cmd += [a for k, v in outputs.items() for a in ("--output", f"{k}={v}")]
    env = {**os.environ, "TUNESMITH_TRACKING": "0", "TUNESMITH_RESULTS": str(work / "results"),
           "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        log = work / "logs" / f"{script}.log"
        raise SystemExit(f"{script} failed:\n{proc.stderr[-2000:]}\n{log.read_text()[-3000:] if log.is_file() else ''}")
    stage = "select" if script == "select_rows" else script
    record = json.loads((work / "results" / "bench" / "tracking" / f"{stage}.json").read_text())
    metrics = {m["key"]: m["value"] for m in record["metrics"]}
    return {"wall": wall, **metrics}


def bench_stages(shared: Path, rows: int | None = None) -> dict:
    from tunesmith.schema import fill_defaults, load_schema

    schema = load_schema("recipe")
    sec = {name: fill_defaults({}, schema["properties"][name], schema)
           for name in ("tokenize", "filter", "dedupe", "select", "format")}
    sec["dataset"] = dataset_section(shared, "toolformer")
    sec["dataset"]["limit"] = rows
    sec["filter"]["max_tokens"] = 2048
    sec["dedupe"]["threshold"] = 0.9
    work = Path(tempfile.mkdtemp(prefix="tunesmith-bench-"))
    d = work / "data"
    d.mkdir()
    p = {"recipe": "bench", "offline": True}
    plan = [
        ("download", {}, {"raw": d / "raw.parquet", "source": d / "source.json"}, ("dataset",)),
        ("tokenize_count", {"raw": d / "raw.parquet", "tokenizer": MODEL},
         {"counts": d / "counts.parquet", "stats": d / "stats.json", "hist": d / "hist.png"}, ("tokenize",)),
        ("filter", {"raw": d / "raw.parquet", "counts": d / "counts.parquet"},
         {"filtered": d / "filtered.parquet", "report": d / "filter_report.json"}, ("filter",)),
        ("dedupe", {"filtered": d / "filtered.parquet"},
         {"deduped": d / "deduped.parquet", "report": d / "dedupe_report.json", "hist": d / "sim.png"}, ("dedupe",)),
        ("select_rows", {"deduped": d / "deduped.parquet"}, {"selected": d / "selected.parquet", "report": d / "select.json"},
         ("select",)),
        ("format", {"selected": d / "selected.parquet", "tokenizer": MODEL},
         {"train": d / "train.jsonl", "eval": d / "eval.jsonl", "preview": d / "preview.txt", "template": d / "t.jinja"},
         ("format",)),
    ]
    print(f"\n== data stages on toolformer ({rows or 'all'} rows), each its own process (MLflow off; one run) ==")
    print(f"{'stage':<15} {'rows in':>8} {'rows out':>9} {'wall s':>7} {'start-up s':>10} {'(imports':>9} {'+ load)':>8} {'work s':>7}")
    for script, inputs, outputs, sections in plan:
        params = {**p, "section": {s: sec[s] for s in sections}}
        m = run_stage(script, {k: str(v) for k, v in inputs.items()}, {k: str(v) for k, v in outputs.items()},
                      params, work)
        imports = m.get("startup_seconds", 0.0)
        load_s = m.get("load_seconds", 0.0)
        rows_out = m.get("rows_out", m.get("rows_train", 0) + m.get("rows_eval", 0))
        print(f"{script:<15} {int(m.get('rows_in', 0)):>8} {int(rows_out):>9} {m['wall']:>7.1f} {imports + load_s:>10.1f} "
              f"{imports:>9.1f} {load_s:>8.1f} {m.get('work_seconds', 0):>7.1f}")
    report = json.loads((d / "dedupe_report.json").read_text())
    filt = json.loads((d / "filter_report.json").read_text())
    print(f"filter accounting: rows_in {filt['rows_in']} = rows_out {filt['rows_out']} + drops {filt['drops']} "
          f"-> {filt['rows_in'] == filt['rows_out'] + sum(filt['drops'].values())}")
    print(f"dedupe at {report['threshold']}: exact removed {report['exact_removed']}, near removed {report['near_removed']}, "
          f"index {report['index_type']} on {report['index_device']}")
    return {"work": work, "report": report}


def bench_embedding(work: Path, report: dict) -> None:
    from tunesmith.data import duplicates, load

    frame = load.read_rows(work / "data" / "filtered.parquet")
    keep, _ = duplicates.exact_duplicates(frame)
    texts = duplicates.field_texts(frame.loc[keep].reset_index(drop=True), report["field"])
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(duplicates.default_model_path()), device="cpu")
    t = time.perf_counter()
    model.encode(texts, batch_size=report["settings"]["batch_size"], show_progress_bar=False)
    bare_s = time.perf_counter() - t
    print("\n== dedupe embedding (all-MiniLM-L6-v2, CPU; one run each) ==")
    print(f"texts embedded: {len(texts)} ({report['field']} field after exact dedupe)")
    print(f"stage embed:            {report['embed_seconds']:.1f} s = {report['embed_rows_per_s']:.1f} rows/s")
    print(f"bare ST.encode:         {bare_s:.1f} s = {len(texts) / bare_s:.1f} rows/s")
    print(f"stage / bare:           {(len(texts) / bare_s) and report['embed_rows_per_s'] / (len(texts) / bare_s):.2f}x")
    print(f"faiss build + {report['neighbors']}-NN search + greedy keep ({report['index_type']}, {report['index_device']}): "
          f"{report['search_seconds']:.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=os.environ.get("TUNESMITH_SHARED_DATA") or str(REPO.parent / "shared" / "data"))
    ap.add_argument("--skip-stages", action="store_true", help="only the token-counting comparison")
    ap.add_argument("--stage-rows", type=int, default=None,
                    help="run the stage chain on the first N toolformer rows (embedding all 7,673 takes "
                         "minutes on a busy 2-core machine); token counting always uses every row")
    args = ap.parse_args()
    shared = Path(args.shared)
    if not (shared / "README.md").is_file():
        raise SystemExit(f"real datasets not found at {shared}: pass --shared or set TUNESMITH_SHARED_DATA")
    if not (MODEL / "tokenizer.json").is_file():
        raise SystemExit(f"{MODEL} missing: run `snakemake --cores 1 resources/models/smollm2-135m-instruct` first")
    import torch

    from tunesmith.data.tokens import load_tokenizer

    print(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}, "
          f"load average {os.getloadavg()[0]:.2f}")
    bench_counting(shared, load_tokenizer(MODEL))
    if not args.skip_stages:
        out = bench_stages(shared, args.stage_rows)
        bench_embedding(out["work"], out["report"])


if __name__ == "__main__":
    main()
