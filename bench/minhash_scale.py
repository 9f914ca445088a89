"""MinHash near-dedupe at scale (bench/data_scale.py --near minhash runs this).

    nice -n 10 .venv/bin/python bench/data_scale.py --near minhash --sizes 1000000 [--shards 4] [--toolformer]

Per size, a filtered.parquet-like file of synthetic rows with planted near duplicates:
- background rows: 2-5 sentences drawn at random from the ~100k distinct sentences of the shared
  real data (GSM8K train + the three GPTeacher sets), so rows share stock sentences (what makes
  real false positives) but are rarely near duplicates of each other;
- planted: 10% of the rows are copies of an earlier background row with word-level edits (a word
  replaced, dropped or inserted; tests/near_plant.py) at edit rates 0, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2
  in turn; the true word 5-gram Jaccard of each copy to its original is computed (for all copies
  up to 200k, a seeded sample beyond).

Then the jobs the workflow runs with dataset.shards N, each in its own process (its peak RSS its
own), two at a time like two cores: the row digests (the filter_shard jobs' work, timed apart),
N minhash_shard, min(N, bands) minhash_buckets, minhash_cluster, dedupe. Printed: wall time and
peak RSS per stage, recall of the planted copies by edit rate and by true Jaccard band, precision
(a removed row is a planted copy, or a real near duplicate of the row kept for it: true Jaccard at
or above the threshold), rows kept. --toolformer: the GPTeacher toolformer set (7,673 rows, field
output) by MinHash beside the embedding path at threshold 0.9, with the overlap of the kept sets.
Files go under --work (default /tmp/minhash_scale), never into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # near_plant: the planting the tests use
SHARED = Path(os.environ.get("TUNESMITH_SHARED_DATA") or REPO.parent / "shared" / "data")
SHARE, RATES, SAMPLE = 0.10, (0.0, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2), 200_000
BANDS = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0)


def sentence_pool() -> list[str]:
    texts = [json.loads(line)["answer"] for line in open(SHARED / "gsm8k" / "train.jsonl", encoding="utf-8")]
    for name in ("toolformer-dedupe-only.json", "codegen-instruct.json", "roleplay-instruct.json"):
        texts += [r["response"] for r in json.loads((SHARED / "gpteacher" / name).read_text(encoding="utf-8"))]
    pool = {s.strip() for t in texts for s in re.split(r"(?<=[.!?])\s+|\n+", t)}
    return sorted(s for s in pool if len(s.split()) >= 4)


def make(n: int, out: Path, seed: int = 0) -> None:
    """rows.parquet + planted.npz (copy, original, rate, true Jaccard or -1) for n rows."""
    from near_plant import edit_words, true_jaccard

    from tunesmith.data import batches

    if (out / "planted.npz").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    pool = sentence_pool()
    vocab = sorted({w for s in pool[:20000] for w in s.split()})
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    k = rng.integers(2, 6, size=n)
    ids = rng.integers(0, len(pool), size=(n, 5)).astype(np.int32)
    is_copy = rng.random(n) < SHARE
    is_copy[:1000] = False
    background = np.flatnonzero(~is_copy)
    copies = np.flatnonzero(is_copy)
    # each copy's original: a background row before it
    before = np.searchsorted(background, copies) - 1
    originals = background[(rng.random(len(copies)) * (before + 1)).astype(np.int64)]
    rates = np.array([RATES[i % len(RATES)] for i in range(len(copies))])
    sampled = np.zeros(len(copies), bool)
    sampled[rng.choice(len(copies), size=min(SAMPLE, len(copies)), replace=False)] = True
    jac = np.full(len(copies), -1.0)
    copy_at = {int(c): i for i, c in enumerate(copies)}

    def text(i: int) -> str:
        return " ".join(pool[j] for j in ids[i, :k[i]])

    started = time.perf_counter()
    with batches.ParquetSink(out / "rows.parquet") as sink:
        for lo in range(0, n, batches.BATCH_ROWS):
            hi = min(n, lo + batches.BATCH_ROWS)
            outs = []
            for i in range(lo, hi):
                c = copy_at.get(i)
                if c is None:
                    outs.append(text(i))
                else:
                    t = edit_words(text(int(originals[c])), float(rates[c]), prng, vocab)
                    if sampled[c]:
                        jac[c] = true_jaccard(text(int(originals[c])), t, 5)
                    outs.append(t)
            import pandas as pd

            sink.write(pd.DataFrame({"id": np.arange(lo, hi), "instruction": "Write the note.", "input": "",
                                     "output": outs, "n_tokens": [len(o.split()) for o in outs],
                                     "source": np.where(np.arange(lo, hi) % 2, "mix-a", "mix-b")}))
    np.savez(out / "planted.npz", copy=copies, original=originals, rate=rates, jaccard=jac)
    print(f"made {n} rows ({len(copies)} planted copies) in {time.perf_counter() - started:.0f} s", flush=True)


def stage(name: str, work: str, shards: int, arg: int) -> dict:
    """One job in this process (the parent runs each in its own)."""
    from tunesmith import fileio
    from tunesmith.data import batches, minhash_jobs
    from tunesmith.data import duplicates as dd
    from tunesmith.schema import section_defaults

    w = Path(work)
    src = str(w / "rows.parquet")
    sec = section_defaults("dedupe", {"method": "minhash"})
    sigs = [str(w / "sig" / f"{i + 1}-of-{shards}.npz") for i in range(shards)]
    groups = min(shards, sec["minhash"]["bands"])
    bucket_files = [str(w / "buckets" / f"{g + 1}-of-{groups}.npz") for g in range(groups)]
    digests = None if name == "digests" else np.load(w / "digests.npz")["digests"]
    if name == "digests":  # what the filter_shard jobs hash in the workflow
        started = time.perf_counter()
        fileio.write_npz(w / "digests.npz", digests=dd.file_digests(src))
        return {"seconds": time.perf_counter() - started, "peak_rss_mb": batches.peak_rss_mb()}
    if name == "minhash_shard":
        return minhash_jobs.minhash_shard(src, sec, arg, shards, sigs[arg]).metrics
    if name == "minhash_buckets":
        return minhash_jobs.minhash_buckets(src, sigs, sec, arg, groups, bucket_files[arg], digests).metrics
    if name == "minhash_cluster":
        return minhash_jobs.minhash_cluster(src, sigs, bucket_files, sec, str(w / "clusters.npz"), digests).metrics
    return _dedupe_with(src, sec, w, digests)


def _dedupe_with(src, sec, w, digests):
    """dedupe_stage.dedupe takes the filter shards' digest files: hand it the one digests file as a shard."""
    from tunesmith import fileio
    from tunesmith.stages import dedupe as dedupe_stage

    n = len(digests)
    fileio.write_npz(w / "digests-1-of-1.npz", digests=digests, start=0, stop=n, total=n)
    return dedupe_stage.dedupe(src, sec, str(w / "deduped.parquet"), str(w / "dedupe_report.json"), str(w / "hist.png"),
                         offline=True, clusters=str(w / "clusters.npz"), digests=[str(w / "digests-1-of-1.npz")]).metrics


def run_jobs(name: str, work: Path, shards: int, args: list[int], parallel: int = 2) -> dict:
    """Jobs of one stage, `parallel` at a time, each its own process: wall time, the largest peak RSS."""
    started = time.perf_counter()
    pending, running, metrics = list(args), [], []
    while pending or running:
        while pending and len(running) < parallel:
            a = pending.pop(0)
            out = work / f".{name}-{a}.json"
            running.append((subprocess.Popen([sys.executable, __file__, "--stage", name, "--work", str(work),
                                              "--shards", str(shards), "--arg", str(a), "--out", str(out)]), out))
        for proc, out in list(running):
            if proc.poll() is not None:
                running.remove((proc, out))
                if proc.returncode:
                    raise SystemExit(f"{name} job failed (exit {proc.returncode})")
                metrics.append(json.loads(out.read_text()))
        time.sleep(0.2)
    return {"wall_s": round(time.perf_counter() - started, 1), "jobs": len(args),
            "peak_rss_mb": max(m["peak_rss_mb"] for m in metrics), "metrics": metrics}


def evaluate(work: Path) -> dict:
    import pyarrow.parquet as pq

    from near_plant import true_jaccard
    from tunesmith.schema import section_defaults

    t = section_defaults("dedupe")["minhash"]["threshold"]
    n = pq.ParquetFile(work / "rows.parquet").metadata.num_rows
    kept = np.zeros(n, bool)
    kept[pq.read_table(work / "deduped.parquet", columns=["id"]).column("id").to_numpy()] = True
    p = np.load(work / "planted.npz")
    found = ~kept[p["copy"]]
    by_rate = {str(r): round(float(found[p["rate"] == r].mean()), 4) for r in RATES}
    jac = p["jaccard"]
    has = jac >= 0
    by_band = {}
    for lo, hi in zip(BANDS[:-1], BANDS[1:]):
        sel = has & (jac >= lo) & ((jac < hi) if hi < 1 else (jac <= 1))
        by_band[f"[{lo},{hi}{']' if hi == 1 else ')'}"] = {"pairs": int(sel.sum()),
                                                        "recall": round(float(found[sel].mean()), 4) if sel.any() else None}
    above = has & (jac >= t)
    removed = np.flatnonzero(~kept)
    report = json.loads((work / "dedupe_report.json").read_text())
    copy_set = np.zeros(n, bool)
    copy_set[p["copy"]] = True
    other = removed[~copy_set[removed]]
    # rows removed that were not planted: exact duplicates (counted apart) or near ones, judged by
    # their true Jaccard to the row kept for them
    with np.load(work / "clusters.npz") as c:
        root = dict(zip(c["removed"].tolist(), c["root"].tolist()))
    near_other = [int(r) for r in other if r in root]
    wrong = 0
    if near_other:
        rows = pq.read_table(work / "rows.parquet", columns=["output"]).column("output")
        for r in near_other[:20000]:
            if true_jaccard(rows[r].as_py(), rows[root[r]].as_py(), 5) < t:
                wrong += 1
        wrong = round(wrong * len(near_other) / min(len(near_other), 20000))
    planted_below = int((found & has & (jac < t)).sum())
    near_removed = report["near_removed"]
    return {"rows": n, "rows_kept": int(kept.sum()), "exact_removed": report["exact_removed"],
            "near_removed": report["near_removed"], "clusters": report["clusters"],
            "recall_at_or_above_threshold": round(float(found[above].mean()), 4), "pairs_at_or_above": int(above.sum()),
            "recall_by_edit_rate": by_rate, "recall_by_true_jaccard": by_band,
            "precision": round(1 - wrong / max(1, near_removed), 5),
            "removed_not_planted": int(len(other)), "removed_not_planted_below_threshold": wrong,
            "planted_removed_below_threshold_sampled": planted_below, "threshold": t}


def toolformer(work: Path) -> dict:
    """MinHash vs the embedding path (threshold 0.9, field output) on the toolformer set."""
    import pandas as pd

    from tunesmith import fileio
    from tunesmith.stages import dedupe as dedupe_stage
    from tunesmith.schema import section_defaults

    work.mkdir(parents=True, exist_ok=True)
    rows = json.loads((SHARED / "gpteacher" / "toolformer-dedupe-only.json").read_text(encoding="utf-8"))
    frame = pd.DataFrame({"id": np.arange(len(rows)), "instruction": [r["instruction"] for r in rows],
                          "input": [r.get("input") or "" for r in rows], "output": [r["response"] for r in rows],
                          "n_tokens": 1})
    src = str(work / "toolformer.parquet")
    fileio.write_parquet(src, frame)
    out = {}
    for method, over in (("minhash", {"method": "minhash"}), ("embedding", {"method": "embedding", "threshold": 0.9})):
        started = time.perf_counter()
        r = dedupe_stage.dedupe(src, section_defaults("dedupe", over), str(work / f"{method}.parquet"),
                          str(work / f"{method}.json"), str(work / f"{method}.png"), offline=True)
        ids = set(pd.read_parquet(work / f"{method}.parquet", columns=["id"])["id"])
        out[method] = {"rows_kept": len(ids), "exact_removed": r.metrics["exact_removed"],
                       "near_removed": r.metrics["near_removed"], "seconds": round(time.perf_counter() - started, 1),
                       "ids": ids}
    both = out["minhash"].pop("ids") & out["embedding"].pop("ids")
    out["kept_by_both"] = len(both)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--shards", type=int, default=None, help="dataset.shards (default: 1 per 250k rows, 2..16)")
    ap.add_argument("--work", default="/tmp/minhash_scale")
    ap.add_argument("--toolformer", action="store_true")
    ap.add_argument("--stage"), ap.add_argument("--arg", type=int, default=0), ap.add_argument("--out")
    args = ap.parse_args()
    if args.stage:
        metrics = stage(args.stage, args.work, args.shards, args.arg)
        Path(args.out).write_text(json.dumps(metrics, default=float))
        return
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    results = {}
    for n in args.sizes:
        work = Path(args.work) / f"n{n}"
        shards = args.shards or max(2, min(16, n // 250_000))
        t0 = time.perf_counter()
        make(n, work)
        t_make = time.perf_counter() - t0
        groups = min(shards, 20)
        res = {"make_s": round(t_make, 1), "shards": shards}
        t_all = time.perf_counter()
        res["digests (filter_shard's work)"] = run_jobs("digests", work, shards, [0], 1)
        t_near = time.perf_counter()
        res["minhash_shard"] = run_jobs("minhash_shard", work, shards, list(range(shards)))
        res["minhash_buckets"] = run_jobs("minhash_buckets", work, shards, list(range(groups)))
        res["minhash_cluster"] = run_jobs("minhash_cluster", work, shards, [0], 1)
        res["dedupe"] = run_jobs("dedupe", work, shards, [0], 1)
        res["near_dedupe_wall_s"] = round(time.perf_counter() - t_near, 1)
        res["with_digests_wall_s"] = round(time.perf_counter() - t_all, 1)
        res["quality"] = evaluate(work)
        res["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        for key in ("minhash_shard", "minhash_buckets", "minhash_cluster", "dedupe", "digests (filter_shard's work)"):
            res[key].pop("metrics")
        results[n] = res
        print(json.dumps({n: res}, indent=1), flush=True)
    if args.toolformer:
        results["toolformer"] = toolformer(Path(args.work) / "toolformer")
        print(json.dumps({"toolformer": results["toolformer"]}, indent=1), flush=True)
    (Path(args.work) / "results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
