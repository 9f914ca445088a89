"""Data chain at scale: rows/s and peak RSS per stage at 100k, 1M and 10M rows, in one table.

    nice -n 10 .venv/bin/python bench/data_scale.py --sizes 100000 1000000 [--work /tmp/data_scale]
        [--embed-share 5000 --embed-jobs 2]   # + near-dedupe's embedding measured on shards, projected
    .venv/bin/python bench/data_scale.py --make-only --sizes 10000000   # only write the synthetic JSONL
    nice -n 10 .venv/bin/python bench/data_scale.py --near minhash --sizes 1000000 10000000 --toolformer
        # MinHash near-dedupe with planted near duplicates: bench/minhash_scale.py

Synthetic rows are built from the shared datasets (../shared/data: GSM8K train + the three
GPTeacher sets, 21,604 real rows) with perturbations, so the sizes past the real data stay
realistic text and hold both kinds of duplicate:
- every row gets a case number in its instruction ("(case 123)"): unique for exact dedupe but a
  near-duplicate of every other row made from the same real row (what near-dedupe would remove);
- one row in 50 repeats the row 7 before it with its case folded and spaces doubled, so exact
  dedupe (which normalises case and white space) has real work.

Each stage runs as its own process (the stage function from tunesmith.stages.<rule>, as the
Snakemake rule's script would call it), so its peak RSS (ru_maxrss of that process, reported in
the stage's metrics as peak_rss_mb) is its own. Near-dedupe is off (bench/dedupe_scale.py
measures it); decontaminate is skipped (the issue's chain: download -> tokenize_count -> filter
-> exact dedupe -> select -> format). Files go under --work (default /tmp/data_scale), never into
the repository; --clean deletes each size's stage outputs after it is measured.

Where a big size cannot finish in the time there is (the 10M run of 2026-11-23, see
docs/benchmarks.md "Data at scale"): --gate-log makes each stage wait for a smaller run's same stage to end with
bounded RSS; --tile-raw N builds the rows by tiling size N's raw.parquet (each copy tagged)
instead of downloading; --estimate-counts puts characters / 4 in place of SmolLM2 counting:

    nice -n 10 .venv/bin/python bench/data_scale.py --sizes 10000000 --tile-raw 1000000 \
        --estimate-counts --gate-log /tmp/data_scale/run_1m.log
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MODEL = REPO / "resources" / "models" / "smollm2-135m-instruct"
# The shared model folder can be rebuilt while a long run goes on: a copy made once by
# tunesmith.models.prepare (the same conversion) stands in when it is absent.
FALLBACK_MODEL = Path(os.environ.get("DATA_SCALE_MODEL", "/tmp/data_scale/smollm2"))


def model_dir() -> Path:
    return MODEL if (MODEL / "tokenizer.json").is_file() else FALLBACK_MODEL
STAGES = ("download", "tokenize_count", "filter", "dedupe", "select", "format")


def real_rows(shared: Path) -> list[tuple[str, str, str]]:
    rows = []
    with open(shared / "gsm8k" / "train.jsonl", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            rows.append((r["question"], "", r["answer"]))
    for name in ("toolformer-dedupe-only.json", "codegen-instruct.json", "roleplay-instruct.json"):
        for r in json.loads((shared / "gpteacher" / name).read_text(encoding="utf-8")):
            rows.append((r["instruction"], r.get("input") or "", r["response"]))
    return rows


def make_jsonl(path: Path, n: int, shared: Path) -> None:
    """n synthetic rows (see the module docstring), written once; an existing file of n rows is reused."""
    if path.is_file() and path.with_suffix(".done").is_file():
        return
    base = real_rows(shared)
    # The JSON-escaped fields once per real row: writing 10M rows is then string joins, not dumps.
    enc = [(json.dumps(i, ensure_ascii=False)[:-1], json.dumps(x, ensure_ascii=False),
            json.dumps(o, ensure_ascii=False)) for i, x, o in base]
    tmp = path.with_suffix(".part")
    started = time.perf_counter()
    with open(tmp, "w", encoding="utf-8") as fh:
        lines = []
        for i in range(n):
            if i % 50 == 49:
                src = i - 7
                b = base[src % len(base)]
                dup = json.dumps(f"{b[0]}  (case {src})".upper(), ensure_ascii=False)
                lines.append(f'{{"instruction": {dup}, "input": {enc[src % len(base)][1]}, '
                             f'"response": {enc[src % len(base)][2]}}}\n')
            else:
                e = enc[i % len(base)]
                lines.append(f'{{"instruction": {e[0]} (case {i})", "input": {e[1]}, "response": {e[2]}}}\n')
            if len(lines) >= 100_000:
                fh.writelines(lines)
                lines = []
        fh.writelines(lines)
    tmp.replace(path)
    path.with_suffix(".done").write_text(str(n))
    print(f"wrote {n} rows to {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.0f} s",
          flush=True)


def sections(src: Path) -> dict[str, dict]:
    from tunesmith.schema import section_defaults

    return {"dataset": section_defaults("dataset", {"source": str(src), "columns": {"output": "response"}}),
            "tokenize": section_defaults("tokenize"), "filter": section_defaults("filter"),
            "dedupe": section_defaults("dedupe", {"near": False}), "select": section_defaults("select"),
            "format": section_defaults("format")}


def run_stage(stage: str, src: Path, out: Path) -> dict:
    """One stage function on the files of one size (in this process: the parent runs each in its own)."""
    from tunesmith.stages import dedupe as dedupe_stage, download as download_stage, embed_shard as embed_shard_stage, filter as filter_stage, format as format_stage, select as select_stage, tokenize_count as tokenize_count_stage

    s = sections(src)
    f = {k: str(out / v) for k, v in [("raw", "raw.parquet"), ("source", "source.json"), ("counts", "counts.parquet"),
                                       ("stats", "stats.json"), ("thist", "token_hist.png"),
                                       ("filtered", "filtered.parquet"), ("freport", "filter.json"),
                                       ("deduped", "deduped.parquet"), ("dreport", "dedupe.json"),
                                       ("dhist", "dedupe_hist.png"), ("selected", "selected.parquet"),
                                       ("sreport", "select.json"), ("train", "train.jsonl"), ("eval", "eval.jsonl"),
                                       ("preview", "preview.txt"), ("template", "template.jinja"),
                                       ("report", "format.json")]}
    if stage.startswith("embed_shard:"):  # embed_shard:<shard, 1-based>:<shards>, near-dedupe's embedding job
        from tunesmith.schema import section_defaults

        shard, shards = (int(x) for x in stage.split(":")[1:])
        (out / "embeddings").mkdir(exist_ok=True)
        r = embed_shard_stage.embed_shard(f["filtered"], section_defaults("dedupe"), shard - 1, shards,
                               str(out / "embeddings" / f"{shard}-of-{shards}.npz"), offline=True)
        return {**r.metrics, "rows_in": r.metrics["rows"], "rows_out": r.metrics["rows"]}
    if stage.startswith("tile_raw:"):
        return tile_raw(Path(stage.split(":", 1)[1]), out, int(src.stem.split("_")[-1]))
    if stage == "estimate_counts":
        return estimate_counts(f["raw"], f["counts"])
    if stage == "download":
        r = download_stage.download(s["dataset"], f["raw"], f["source"], offline=True, cache_dir=str(out / "cache"))
    elif stage == "tokenize_count":
        r = tokenize_count_stage.tokenize_count(f["raw"], str(model_dir()), s["tokenize"], f["counts"], f["stats"], f["thist"])
    elif stage == "filter":
        r = filter_stage.filter_rows(f["raw"], f["counts"], s["filter"], f["filtered"], f["freport"])
    elif stage == "dedupe":
        r = dedupe_stage.dedupe(f["filtered"], s["dedupe"], f["deduped"], f["dreport"], f["dhist"], offline=True)
    elif stage == "select":
        r = select_stage.select(f["deduped"], s["select"], f["selected"], f["sreport"])
    else:
        r = format_stage.format_rows(f["selected"], str(model_dir()), s["format"], f["train"], f["eval"], f["preview"],
                               f["template"], f["report"])
    return r.metrics


def estimate_counts(raw: str, counts: str) -> dict:
    """--estimate-counts: token counts as characters / 4 (pyarrow compute, seconds for 10M rows)
    in place of the tokenize_count stage, so the later stages can be measured at a size where real
    counting takes longer than there is time for. Labelled as such in the table."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from tunesmith.data import batches

    started = time.perf_counter()
    with batches.ParquetSink(counts) as sink:
        for b in batches.iter_batches(raw, ["id", "instruction", "input", "output"]):
            n_in = pc.divide(pc.add(pc.utf8_length(b.column("instruction")), pc.utf8_length(b.column("input"))), 4)
            n_out = pc.divide(pc.utf8_length(b.column("output")), 4)
            n_in, n_out = pc.cast(n_in, pa.int64()), pc.cast(n_out, pa.int64())
            sink.write(pa.table({"id": b.column("id"), "n_instruction_tokens": n_in, "n_output_tokens": n_out,
                                 "n_tokens": pc.add(n_in, n_out)}))
        rows = sink.rows
    return {"rows_in": rows, "rows_out": rows, "work_seconds": time.perf_counter() - started,
            "peak_rss_mb": batches.peak_rss_mb()}


def tile_raw(small: Path, out: Path, size: int) -> dict:
    """--tile-raw: out/raw.parquet as `size` rows made by repeating a smaller run's raw.parquet, each
    repeat's instructions tagged "(copy k)" (so they stay unique) and ids renumbered: the rows the
    later stages would see, in seconds instead of a 10M-row download (pyarrow, batch by batch)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from tunesmith.data import batches

    started = time.perf_counter()
    n_small = batches.num_rows(small)
    with batches.ParquetSink(out / "raw.parquet", batches.schema(small)) as sink:
        for k in range(-(-size // n_small)):
            for b in batches.iter_batches(small):
                if sink.rows >= size:
                    break
                b = b.slice(0, size - sink.rows)
                cols = {name: b.column(name) for name in b.schema.names}
                if k:
                    cols["instruction"] = pc.binary_join_element_wise(cols["instruction"], f" (copy {k})", "")
                cols["id"] = pa.array(np.arange(sink.rows, sink.rows + b.num_rows, dtype=np.int64))
                sink.write(pa.RecordBatch.from_arrays(list(cols.values()), names=list(cols)))
        rows = sink.rows
    return {"rows_in": rows, "rows_out": rows, "work_seconds": time.perf_counter() - started,
            "peak_rss_mb": batches.peak_rss_mb()}


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure(stage: str, src: Path, out: Path, rss_limit_mb: float) -> dict:
    """Run one stage in a fresh process, killed if its RSS passes rss_limit_mb (a watchdog: the
    machine is shared); wall time includes interpreter start-up and imports."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--stage", stage, "--src", str(src), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, text=True)
    watched = 0.0
    next_note = 60.0
    while proc.poll() is None:
        watched = max(watched, rss_mb(proc.pid))
        if time.perf_counter() - started > next_note:  # a trace, to see RSS go flat while a long stage runs
            print(f"  {stage} {src.name}: {next_note:.0f} s, peak RSS so far {watched:.0f} MB", file=sys.stderr, flush=True)
            next_note += 60.0
        if watched > rss_limit_mb:
            proc.kill()
            proc.wait()
            raise SystemExit(f"{stage} on {src.name}: RSS passed {rss_limit_mb:.0f} MB; killed")
        time.sleep(0.5)
    stdout = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{stage} on {src.name} failed (exit {proc.returncode})")
    metrics = json.loads(stdout.strip().splitlines()[-1])
    metrics["wall_seconds"] = time.perf_counter() - started
    return metrics


# all-MiniLM-L6-v2 on a lent H100 (docs/benchmarks.md "Near-dedupe at a million rows"): the GPU row of the projection.
H100_ROWS_PER_S = (2550, 3950)


def embed_share(out: Path, size: int, share_rows: int, jobs: int, rss_limit_mb: float) -> list[dict]:
    """Near-dedupe's embedding at `size` rows, measured on a share: the shard jobs of
    dataset.shards = size / share_rows. Shard 1 runs alone with every core, then shards 1..jobs at
    once with cores / jobs threads each (as N SLURM jobs would run side by side; shard 1 again, so
    that one job's rate alone and beside the others is on the same rows: text length sets the
    rate). The time for all the rows is projected from the rate alone."""
    shards = max(jobs, -(-size // share_rows))
    cores = os.cpu_count() or 1
    alone = measure(f"embed_shard:1:{shards}", out / "rows.jsonl", out, rss_limit_mb)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // jobs)))
    procs = [subprocess.Popen([sys.executable, __file__, "--stage", f"embed_shard:{k}:{shards}", "--src",
                               str(out / "rows.jsonl"), "--out", str(out)],
                              env=dict(env, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"), stdout=subprocess.PIPE, text=True)
             for k in range(1, 1 + jobs)]
    side = []
    for proc in procs:
        stdout = proc.communicate()[0]
        if proc.returncode:
            raise SystemExit(f"embed_shard job failed (exit {proc.returncode})")
        side.append(json.loads(stdout.strip().splitlines()[-1]))
    one = alone["embed_rows_per_s"]
    each = sum(m["embed_rows_per_s"] for m in side) / len(side)
    print(f"\nnear-dedupe embedding at {size:,} rows (all-MiniLM-L6-v2), measured on {jobs} of {shards} shards "
          f"of ~{share_rows:,} rows; load average now {os.getloadavg()[0]:.1f}:")
    print(f"  shard 1 alone, {cores} threads: {one:,.1f} rows/s (model load {alone['load_seconds']:.0f} s, "
          f"job {alone['wall_seconds']:.0f} s, peak RSS {alone['peak_rss_mb']:,.0f} MB)")
    print(f"  shards 1-{jobs} at once, {max(1, cores // jobs)} thread(s) each: "
          + ", ".join(f"{m['embed_rows_per_s']:,.1f}" for m in side)
          + f" rows/s (shard 1 {side[0]['embed_rows_per_s']:,.1f}), {each * jobs:,.1f} rows/s together")
    print(f"| embedding {size:,} rows | time (projected) |\n|---|---|")
    rows = [("one CPU job like this machine's (dataset.shards: 1)", size / one)]
    for n in (8, 32, 128):
        rows.append((f"{n} SLURM CPU jobs like this machine's, in parallel (dataset.shards: {n})", size / n / one))
    rows.append((f"one H100 ({H100_ROWS_PER_S[0]:,}-{H100_ROWS_PER_S[1]:,} rows/s, measured in an earlier session)",
                 size / sum(H100_ROWS_PER_S) * 2))
    for label, seconds in rows:
        print(f"| {label} | {seconds / 60:,.1f} min |")
    return [{"rows": size, "stage": "embed (1 job)", "rows_in": alone["rows"], "rows_out": alone["rows"],
             "wall_s": alone["wall_seconds"], "work_s": alone["embed_seconds"], "rows_per_s": one,
             "peak_rss_mb": alone["peak_rss_mb"]}]


def wait_for_gate(log: Path, stage: str, limit_mb: float) -> None:
    """Hold a big run's stage until the smaller run's same stage has shown bounded memory."""
    while True:
        for line in log.read_text().splitlines() if log.is_file() else []:
            if line.startswith("{") and json.loads(line)["stage"] == stage:
                row = json.loads(line)
                if row["peak_rss_mb"] > limit_mb:
                    raise SystemExit(f"gate: {stage} peaked at {row['peak_rss_mb']} MB on {row['rows']} rows "
                                     f"(over {limit_mb} MB): not starting it on more rows")
                return
        if "failed" in (log.read_text() if log.is_file() else "") or "killed" in (log.read_text() if log.is_file() else ""):
            raise SystemExit(f"gate: the run logged in {log} failed")
        time.sleep(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--work", default="/tmp/data_scale")
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--rss-limit-mb", type=float, default=6000)
    ap.add_argument("--clean", action="store_true", help="delete each size's stage outputs once measured")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                    help="run only these (the earlier stages' outputs must be in --work already)")
    ap.add_argument("--gate-log", help="the output of a smaller run going on beside this one: each stage here "
                                       "waits until that run's same stage ended with a peak RSS under --gate-rss-mb")
    ap.add_argument("--gate-rss-mb", type=float, default=1500)
    ap.add_argument("--tile-raw", type=int, help="replace download by tiling the raw.parquet of this smaller size "
                                                   "(see tile_raw)")
    ap.add_argument("--estimate-counts", action="store_true",
                    help="replace tokenize_count by counts estimated as characters / 4 (see estimate_counts)")
    ap.add_argument("--embed-share", type=int, default=0, metavar="ROWS",
                    help="after each size's chain, embed shards of about ROWS rows of its filtered rows as "
                         "near-dedupe's embed_shard jobs would (one alone, then --embed-jobs at once) and project "
                         "the whole size's embedding for N SLURM jobs and a GPU (0: off)")
    ap.add_argument("--embed-jobs", type=int, default=2, help="shard jobs run side by side for --embed-share")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    table = []
    for size in a.sizes:
        src = work / f"rows_{size}.jsonl"
        if not a.tile_raw:
            make_jsonl(src, size, Path(a.shared))
        out = work / f"out_{size}"
        out.mkdir(exist_ok=True)
        chain_started = time.perf_counter()
        ran = []
        for stage in a.stages:
            if stage == "tokenize_count" and a.estimate_counts:
                stage = "estimate_counts"
            if stage == "download" and a.tile_raw:
                stage = f"tile_raw:{work / f'out_{a.tile_raw}' / 'raw.parquet'}"
            if a.gate_log and stage in STAGES:
                wait_for_gate(Path(a.gate_log), stage, a.gate_rss_mb)
            m = measure(stage, src, out, a.rss_limit_mb)
            row = {"rows": size, "stage": stage.split(":")[0], "rows_in": m["rows_in"], "rows_out": m["rows_out"],
                   "wall_s": m["wall_seconds"], "work_s": m["work_seconds"],
                   "rows_per_s": m["rows_in"] / m["work_seconds"] if m["work_seconds"] else 0.0,
                   "peak_rss_mb": m["peak_rss_mb"]}
            table.append(row)
            ran.append(row)
            print(json.dumps(row), flush=True)
        table.append({"rows": size, "stage": ("whole chain" if len(ran) == len(STAGES) else "stages run")
                      + (" (est.)" if a.estimate_counts else ""),
                      "rows_in": ran[0]["rows_in"], "rows_out": ran[-1]["rows_out"],
                      "wall_s": time.perf_counter() - chain_started, "work_s": sum(r["work_s"] for r in ran),
                      "rows_per_s": 0.0, "peak_rss_mb": max(r["peak_rss_mb"] for r in ran)})
        if a.embed_share:
            table += embed_share(out, size, a.embed_share, a.embed_jobs, a.rss_limit_mb)
        disk = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 1e9
        print(f"size {size}: chain {table[-1]['wall_s']:.0f} s, outputs {disk:.2f} GB under {out}", flush=True)
        if a.clean:
            for p in out.iterdir():
                if p.is_file():
                    p.unlink()
    print(f"\n{'rows':>10} | {'stage':<16} | {'rows in':>10} | {'rows out':>10} | {'wall s':>8} | {'work s':>8} | "
          f"{'rows/s (work)':>13} | {'peak RSS MB':>11}")
    for r in table:
        rate = f"{r['rows_per_s']:,.0f}" if r["rows_per_s"] else ""
        print(f"{r['rows']:>10,} | {r['stage']:<16} | {r['rows_in']:>10,} | {r['rows_out']:>10,} | {r['wall_s']:>8.1f} | "
              f"{r['work_s']:>8.1f} | {rate:>13} | {r['peak_rss_mb']:>11,.0f}")


if __name__ == "__main__" and "--near" in sys.argv:  # --near minhash: bench/minhash_scale.py, same flags
    at = sys.argv.index("--near")
    if sys.argv[at + 1:at + 2] != ["minhash"]:
        raise SystemExit("--near takes one value: minhash (the embedding path: --embed-share, bench/dedupe_scale.py)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import minhash_scale

    sys.argv = [minhash_scale.__file__, *sys.argv[1:at], *sys.argv[at + 2:]]
    minhash_scale.main()
elif __name__ == "__main__" and "--stage" in sys.argv:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", required=True, help=f"one of {STAGES}, estimate_counts, tile_raw:<small raw.parquet>")
    ap.add_argument("--src", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import logging

    logging.basicConfig(level=logging.INFO, format=f"  %(asctime)s {a.stage}: %(message)s", stream=sys.stderr)
    print(json.dumps(run_stage(a.stage, Path(a.src), Path(a.out)), default=float))
elif __name__ == "__main__" and "--make-only" in sys.argv:
    ap = argparse.ArgumentParser()
    ap.add_argument("--make-only", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="+", required=True)
    ap.add_argument("--work", default="/tmp/data_scale")
    a = ap.parse_args()
    for size in a.sizes:
        Path(a.work).mkdir(parents=True, exist_ok=True)
        make_jsonl(Path(a.work) / f"rows_{size}.jsonl", size, SHARED)
elif __name__ == "__main__":
    main()
