"""Near-dedupe at scale: recall of the approximate indexes against exact flat search, and the time
of index build + search + greedy keep at 10k, 100k and 1M vectors. Prints ONE table from one run.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/dedupe_scale.py \
        [--shared ../shared/data] [--real-rows 6000] [--sizes 10000,100000,1000000] [--cache /tmp/x.npy]

Vectors: the first --real-rows are REAL all-MiniLM-L6-v2 embeddings (tunesmith.data.duplicates.embed,
the stage's own call) of the GPTeacher toolformer responses, then codegen responses; they are
cached (--cache) because embedding runs at about 95-150 rows/s on 2 CPU cores. Every further row
is synthesised from them, in order:
- with probability --dup-share (0.1) a near duplicate of a random EARLIER row: that row plus
  Gaussian noise scaled so that the expected cosine to it is uniform in [0.90, 0.995], so pairs
  fall on both sides of the 0.95 threshold;
- otherwise a new row: a random real vector plus noise for an expected cosine of 0.85 to it
  (two such children of one real vector are about 0.72 apart: topic clusters, not duplicates).
For unit vectors in d dims, noise N(0, s^2 I) gives cos ~ 1/sqrt(1 + d s^2); rows are re-normalised.

Recall: the above-threshold pairs {i, j} (cosine >= threshold) that the index's pipeline finds
(its k-NN lists plus, where a row's k neighbours are all above the threshold, the rescan), over
the pairs exact flat range search finds. At 1M the flat all-pairs search (about 100x the 100k one)
is not run: recall is taken on --sample-queries (5,000) random rows, whose exact pairs come from a
flat range search of those rows against all 1M. With --search-sample (on by default: the full
search takes most of an hour on 2 loaded cores) only those rows are searched too: the index is
built on all rows, the search time is projected x rows/sample and greedy keep is not run. Up to
100k rows the flat pipeline's own pairs are the exact ones (its k-NN lists plus range rescans miss
none).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tunesmith.data import duplicates as dedupe  # noqa: E402  (the embedding near-dedupe)
from tunesmith.schema import section_defaults  # noqa: E402


def real_texts(shared: Path, n: int) -> list[str]:
    texts: list[str] = []
    for name in ("toolformer-dedupe-only.json", "codegen-instruct.json", "roleplay-instruct.json"):
        texts += [r["response"] for r in json.loads((shared / "gpteacher" / name).read_text())]
    if len(texts) < n:
        raise SystemExit(f"only {len(texts)} real texts under {shared}/gpteacher, asked {n}")
    return texts[:n]


def real_vectors(shared: Path, n: int, cache: Path) -> tuple[np.ndarray, float | None]:
    """(vectors, rows/s of the embedding, None when read from the cache)."""
    if cache.exists():
        vectors = np.load(cache)
        if len(vectors) >= n:
            return vectors[:n], None
    texts = real_texts(shared, n)
    model = dedupe.load_embedder("default", offline=True, device="cpu")
    started = time.perf_counter()
    vectors = dedupe.embed(model, texts, 64)
    rate = n / (time.perf_counter() - started)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return vectors, rate


def synthesise(real: np.ndarray, n: int, dup_share: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r, d = real.shape
    out = np.empty((n, d), dtype=np.float32)
    head = min(r, n)
    out[:head] = real[:head]
    chunk = 50_000
    for start in range(head, n, chunk):
        stop = min(n, start + chunk)
        m = stop - start
        is_dup = rng.random(m) < dup_share
        # a duplicate's parent: any earlier row (those inside this chunk come from before it, to stay vectorised)
        base = real[rng.integers(0, r, m)]
        base[is_dup] = out[rng.integers(0, start, int(is_dup.sum()))]
        cos = np.where(is_dup, rng.uniform(0.90, 0.995, m), 0.85)
        sigma = np.sqrt((1.0 / cos ** 2 - 1.0) / d).astype(np.float32)
        block = base + sigma[:, None] * rng.standard_normal((m, d), dtype=np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def pair_set(sims: np.ndarray, ids: np.ndarray, threshold: float, rows: np.ndarray | None = None) -> set[tuple[int, int]]:
    """Unordered above-threshold pairs in k-NN lists (query rows = rows, or 0..n-1)."""
    q = np.arange(len(ids)) if rows is None else rows
    hit = (sims >= threshold) & (ids >= 0) & (ids != q[:, None])
    a = np.repeat(q, hit.sum(axis=1))
    b = ids[hit]
    return set(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()))


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def run_kind(vectors: np.ndarray, kind: str, section: dict, threshold: float, sample: np.ndarray | None):
    """The stage's own near_duplicates; the pairs its k-NN lists and rescans hold (on sampled rows)."""
    r = dedupe.near_duplicates(vectors, threshold, k=section["neighbors"], index=kind, settings=section, collect=True)
    rows = np.arange(len(vectors)) if sample is None else sample
    found = pair_set(r.sims[rows], r.ids[rows], threshold, rows)
    sampled = set(rows.tolist()) if sample is not None else None
    for pos, (s, i) in r.rescans.items():
        if sampled is None or pos in sampled:
            found |= pair_set(s[None], i[None], threshold, np.array([pos]))
    return {"build_s": r.build_seconds, "search_s": r.knn_seconds, "greedy_s": r.greedy_seconds, "keep": r.keep,
            "pairs": found, "rescanned": r.rescanned, "device": r.index_device}


def run_kind_sampled(vectors: np.ndarray, kind: str, section: dict, threshold: float, sample: np.ndarray):
    """Above 100k rows on 2 CPU cores: build on all rows, search the sampled rows only; the search
    and greedy times are projected linearly to all rows (each row's search costs the same)."""
    k = section["neighbors"] + 1
    t0 = time.perf_counter()
    index, device, rescan_index = dedupe.build_index(vectors, kind, section)
    t1 = time.perf_counter()
    sims, ids = dedupe.neighbours(index, vectors[sample], k, device)
    found = pair_set(sims, ids, threshold, sample)
    full = np.flatnonzero((sims[:, -1] >= threshold) & (ids[:, -1] >= 0))
    if rescan_index is not None:
        for row in full:
            s, i = dedupe.range_rescan(rescan_index, vectors, int(sample[row]), threshold)
            found |= pair_set(s[None], i[None], threshold, sample[row:row + 1])
    t2 = time.perf_counter()
    scale = len(vectors) / len(sample)
    return {"build_s": t1 - t0, "search_s": (t2 - t1) * scale, "greedy_s": float("nan"), "keep": None,
            "pairs": found, "rescanned": int(len(full) * scale), "device": device, "projected": True}


def exact_pairs(vectors: np.ndarray, threshold: float, rows: np.ndarray | None) -> tuple[set[tuple[int, int]], float]:
    import faiss

    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    q = np.arange(len(vectors)) if rows is None else rows
    out: set[tuple[int, int]] = set()
    for start in range(0, len(q), 20_000):
        part = q[start:start + 20_000]
        lims, dist, found = flat.range_search(vectors[part], float(np.nextafter(np.float32(threshold), -1)))
        a = np.repeat(part, np.diff(lims).astype(np.int64))
        keep = (found != a) & (dist >= threshold)
        out |= set(zip(np.minimum(a[keep], found[keep]).tolist(), np.maximum(a[keep], found[keep]).tolist()))
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    p.add_argument("--real-rows", type=int, default=6000)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--kinds", default="flat,ivf,hnsw", help="flat runs up to 100k rows")
    p.add_argument("--hnsw-max-rows", type=int, default=10_000,
                   help="hnsw only up to this size: at 20k rows on 2 loaded cores it took 95 s against IVF's 13")
    p.add_argument("--dup-share", type=float, default=0.1)
    p.add_argument("--sample-queries", type=int, default=5_000)
    p.add_argument("--search-sample", action=argparse.BooleanOptionalAction, default=True,
                   help="above 100k rows search only the sampled rows and project the search time (default on)")
    p.add_argument("--cache", default="/tmp/tunesmith-bench/dedupe_real_vectors.npy")
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args()

    section = section_defaults("dedupe")
    threshold = section["threshold"]
    real, rate = real_vectors(Path(args.shared), args.real_rows, Path(args.cache))
    print(f"real vectors: {len(real)} x {real.shape[1]} (all-MiniLM-L6-v2, GPTeacher responses); "
          + (f"embedded at {rate:.1f} rows/s" if rate else f"read from {args.cache}"))
    print(f"defaults: threshold {threshold}, neighbors {section['neighbors']}, flat_max_rows {section['flat_max_rows']}, "
          f"ivf {section['ivf']}, hnsw {section['hnsw']}")
    rows_out = []
    header = f"{'rows':>9} {'index':>5} {'build s':>8} {'search s':>9} {'greedy s':>9} {'total s':>8} " \
             f"{'pairs exact':>11} {'recall':>7} {'kept = flat':>11} {'rescans':>8} {'peak RSS GB':>11}"
    for n in [int(s) for s in args.sizes.split(",")]:
        vectors = synthesise(real, n, args.dup_share)
        sample = None
        kinds = [k for k in args.kinds.split(",") if not (k == "flat" and n > 100_000)
                 and not (k == "hnsw" and n > args.hnsw_max_rows)]
        if n > 100_000:
            sample = np.sort(np.random.default_rng(1).choice(n, min(args.sample_queries, n), replace=False))
        results = {}
        for kind in kinds:
            if sample is not None and args.search_sample:
                results[kind] = run_kind_sampled(vectors, kind, section, threshold, sample)
            else:
                results[kind] = run_kind(vectors, kind, section, threshold, sample)
            r = results[kind]
            print(f"  {n:,} {kind}: build {r['build_s']:.1f} s, search {r['search_s']:.1f} s, greedy {r['greedy_s']:.1f} s",
                  flush=True)
            gc.collect()
        if "flat" in results:
            # the flat pipeline is exact: a row whose k-th neighbour is below the threshold has all its
            # pairs in its list, and every other row is range-searched
            truth, truth_s = results["flat"]["pairs"], results["flat"]["search_s"]
        else:
            truth, truth_s = exact_pairs(vectors, threshold, sample)
        flat_keep = results["flat"]["keep"] if "flat" in results else None
        for kind, r in results.items():
            recall = len(r["pairs"] & truth) / len(truth) if truth else 1.0
            same = "-" if flat_keep is None or r["keep"] is None else ("yes" if (r["keep"] == flat_keep).all()
                                                   else f"{int((r['keep'] != flat_keep).sum())} differ")
            total = r["build_s"] + r["search_s"] + (0.0 if np.isnan(r["greedy_s"]) else r["greedy_s"])
            row = {"rows": n, "index": kind, "build_s": r["build_s"], "search_s": r["search_s"], "greedy_s": r["greedy_s"],
                   "total_s": total, "exact_pairs": len(truth), "recall": recall, "kept_equal_flat": same,
                   "rescans": r["rescanned"], "sampled_queries": None if sample is None else len(sample),
                   "removed": None if r["keep"] is None else int((~r["keep"]).sum()), "device": r["device"],
                   "search_projected": bool(r.get("projected"))}
            rows_out.append(row)
        print(f"\n{n:,} rows ({'all rows' if sample is None else f'recall on {len(sample):,} sampled rows'}"
              + ("; * search timed on the sampled rows only, x rows/sample; greedy not run"
                 if sample is not None and args.search_sample else "") + "; "
              f"exact pairs by flat range search in {truth_s:.1f} s)")
        print(header)
        for row in rows_out:
            if row["rows"] == n:
                mark = "*" if row["search_projected"] else " "
                print(f"{n:>9,} {row['index']:>5} {row['build_s']:>8.2f} {row['search_s']:>8.2f}{mark} {row['greedy_s']:>9.2f} "
                      f"{row['total_s']:>8.2f} {row['exact_pairs']:>11,} {row['recall']:>7.4f} {row['kept_equal_flat']:>11} "
                      f"{row['rescans']:>8,} {rss_gb():>11.2f}", flush=True)
        del vectors, results
        gc.collect()
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=1))


if __name__ == "__main__":
    main()
