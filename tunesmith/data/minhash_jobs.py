"""The MinHash near-dedupe jobs as functions of paths (tunesmith/stages/minhash_*.py map their rules'
files onto them; bench/ and tests call them directly): minhash_shard -> minhash_buckets -> minhash_cluster, then
the dedupe job applies the clusters (apply). The logic lives in tunesmith.data.minhash; this is
file handling and accounting.

Every row position here is a position in the rule's input (filtered.parquet), before exact
dedupe: the shards cut those rows with batches.shard_bounds, and exact duplicates are left out of
the buckets by the `alive` mask (exact_keep), so exact and near removals are counted apart.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from tunesmith import fileio
from tunesmith.data import batches, duplicates, minhash
from tunesmith.data.accounting import stage_result
from tunesmith.errors import DataError
from tunesmith.result import Result


def exact_keep(in_path: str, section: dict[str, Any],
               digests: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keep, first) of exact dedupe over in_path's rows (duplicates.first_occurrences); digests: those
    the filter shard jobs hashed, else hashed here batch by batch (16 bytes a row kept)."""
    if digests is None:
        digests = duplicates.file_digests(in_path)
    if not section["exact"]:
        return np.ones(len(digests), dtype=bool), np.arange(len(digests))
    return duplicates.first_occurrences(digests)


# ---------------------------------------------------------------- the jobs

def minhash_shard(in_path: str, section: dict[str, Any], shard: int, shards: int, out_path: str) -> Result:
    """Signatures of shard `shard` (0-based) of in_path's rows: one npz member per LSH band."""
    started = time.perf_counter()
    mh = minhash.settings(section)
    sigs, bounds = minhash.shard_signatures(in_path, section, shard, shards)
    minhash.write_signatures(out_path, sigs, mh, start=bounds["start"], stop=bounds["stop"], total=bounds["total"])
    seconds = time.perf_counter() - started
    rows = len(sigs)
    return stage_result({"rows": rows, "rows_total": bounds["total"], "shard": shard, "shards": shards,
                         "rows_per_s": round(rows / seconds, 1) if seconds else 0.0, "load_seconds": 0.0,
                         "work_seconds": seconds},
                        summary=f"shard {shard + 1}/{shards}: {rows} signatures")


def shard_bounds_of(paths: Sequence[str], total: int | None = None) -> list[tuple[int, int]]:
    """The (start, stop) rows of each signature shard, checked to meet end to end (the shard
    contract every scatter/gather stage shares: batches.check_shards)."""
    bounds = []
    for path in paths:
        with np.load(path) as f:
            bounds.append((int(f["start"]), int(f["stop"]), int(f["total"]), len(f["rest"])))
    batches.check_shards(list(paths), bounds, unit="signatures", job="minhash_shard", total=total)
    return [(start, stop) for start, stop, _, _ in bounds]


def minhash_buckets(in_path: str, shard_paths: Sequence[str], section: dict[str, Any], group: int, groups: int,
                    out_path: str, digests: np.ndarray | None = None) -> Result:
    """Candidate pairs of band group `group` (0-based) of `groups`, over every shard's signatures."""
    started = time.perf_counter()
    mh = minhash.settings(section)
    total = batches.num_rows(in_path)
    shard_bounds_of(shard_paths, total)
    alive, _ = exact_keep(in_path, section, digests)
    bands = minhash.band_groups(mh["bands"], groups)[group]
    pairs = minhash.group_buckets(shard_paths, mh, bands, alive)
    fileio.write_npz(out_path, pairs=pairs, bands=np.array(bands), total=total)
    return stage_result({"rows": total, "bands": len(bands), "candidate_pairs": int(len(pairs)), "group": group,
                    "groups": groups, "load_seconds": 0.0, "work_seconds": time.perf_counter() - started},
                   summary=f"band group {group + 1}/{groups}: {len(pairs)} candidate pairs in {len(bands)} bands")


def cluster_arrays(in_path: str, shard_paths: Sequence[str], bucket_paths: Sequence[str], section: dict[str, Any],
                   digests: np.ndarray | None = None) -> dict[str, Any]:
    """Verify the candidate pairs on whole signatures and cluster them (see minhash.clusters)."""
    mh = minhash.settings(section)
    total = batches.num_rows(in_path)
    bounds = shard_bounds_of(shard_paths, total)
    alive, _ = exact_keep(in_path, section, digests)
    found, bands_seen = [], []
    for path in bucket_paths:
        with np.load(path) as f:
            if int(f["total"]) != total:
                raise DataError(f"{path}: buckets of {int(f['total'])} rows, {in_path} holds {total}: re-run the "
                                f"minhash_buckets jobs")
            found.append(f["pairs"])
            bands_seen.extend(int(b) for b in f["bands"])
    if sorted(bands_seen) != list(range(mh["bands"])):
        raise DataError(f"{bucket_paths[0] if bucket_paths else 'minhash_buckets'}: the bucket files cover bands "
                        f"{sorted(bands_seen)}, not 0..{mh['bands'] - 1}: re-run the minhash_buckets jobs")
    pairs = minhash.unique_pairs(np.concatenate(found)) if found else np.zeros((0, 2), np.int64)
    jaccard, checked = minhash.check_borderline(in_path, section["field"], mh, pairs,
                                                minhash.pair_agreement(shard_paths, bounds, mh, pairs))
    out = minhash.clusters(total, pairs, alive, jaccard, mh["threshold"])
    # examples: removed rows with the row kept for them
    examples = minhash.example_pairs(out["keep"], out["root"], alive, max(200, section["sample_pairs"]))
    ex_jaccard = minhash.pair_agreement(shard_paths, bounds, mh, examples)
    return {"keep": out["keep"], "root": out["root"], "alive": alive, "candidate_pairs": len(pairs),
            "checked_pairs": checked,
            "verified_pairs": len(out["pairs"]), "pair_jaccard": out["pair_jaccard"],
            "examples": examples, "example_jaccard": ex_jaccard}


def minhash_cluster(in_path: str, shard_paths: Sequence[str], bucket_paths: Sequence[str], section: dict[str, Any],
                    out_path: str, digests: np.ndarray | None = None) -> Result:
    started = time.perf_counter()
    c = cluster_arrays(in_path, shard_paths, bucket_paths, section, digests)
    removed = np.flatnonzero(c["alive"] & ~c["keep"])
    fileio.write_npz(out_path, removed=removed, root=c["root"][removed], alive_rows=int(c["alive"].sum()),
                     total=len(c["keep"]), candidate_pairs=c["candidate_pairs"], verified_pairs=c["verified_pairs"],
                     checked_pairs=c["checked_pairs"],
                     pair_jaccard=c["pair_jaccard"].astype(np.float32), examples=c["examples"],
                     example_jaccard=c["example_jaccard"])
    summary = minhash.cluster_summary(c["keep"], c["root"], c["alive"])
    return stage_result({"rows": len(c["keep"]), "candidate_pairs": c["candidate_pairs"],
                    "verified_pairs": c["verified_pairs"], "checked_pairs": c["checked_pairs"],
                    "clusters": summary["clusters"],
                    "near_removed": summary["near_removed"], "load_seconds": 0.0,
                    "work_seconds": time.perf_counter() - started},
                   summary=f"{summary['clusters']} clusters, {summary['near_removed']} rows to remove")


# ---------------------------------------------------------------- in the dedupe job

def in_process(in_path: str, section: dict[str, Any], work_dir: str, digests: np.ndarray | None = None) -> str:
    """dataset.shards = 1: the three jobs run here, one after another, their files under work_dir
    (the same functions, so 1 shard and N shards keep the same rows). Returns the clusters file."""
    from pathlib import Path

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sig = str(work / "signatures-1-of-1.npz")
    minhash_shard(in_path, section, 0, 1, sig)
    buckets = str(work / "buckets-1-of-1.npz")
    minhash_buckets(in_path, [sig], section, 0, 1, buckets, digests)
    clusters = str(work / "clusters.npz")
    minhash_cluster(in_path, [sig], [buckets], section, clusters, digests)
    return clusters


def read_clusters(path: str, total: int) -> dict[str, Any]:
    with np.load(path) as f:
        c = {k: f[k] for k in f.files}
    if int(c["total"]) != total:
        raise DataError(f"{path}: clusters of {int(c['total'])} rows, the rows to dedupe are {total}: re-run "
                        f"minhash_cluster")
    keep = np.ones(total, dtype=bool)
    keep[c["removed"]] = False
    root = np.arange(total)
    root[c["removed"]] = c["root"]
    c["near_keep"], c["root_of"] = keep, root
    return c


def report(c: dict[str, Any], alive: np.ndarray, section: dict[str, Any], texts: dict[int, tuple[int, str, str]],
           why: str) -> dict[str, Any]:
    """The near part of dedupe_report.json: method and why, the settings' S-curve, clusters and
    their sizes, examples (a removed row and the row kept for it) with their
    Jaccard estimate and exact Jaccard (texts: position -> (id, shown text, field text))."""
    mh = section["minhash"]
    summary = minhash.cluster_summary(c["near_keep"], c["root_of"], alive)
    examples = []
    for i in minhash.iter_sample(c["examples"], c["example_jaccard"], section["sample_pairs"]):
        kept, removed = (int(x) for x in c["examples"][i])
        exact = minhash.true_jaccard([texts[kept][2]], [texts[removed][2]], mh["ngram"])[0]
        examples.append({"jaccard_estimate": round(float(c["example_jaccard"][i]), 4),
                         "jaccard": round(float(exact), 4),
                         "kept_id": texts[kept][0], "kept_text": duplicates._clip(texts[kept][1]),
                         "removed_id": texts[removed][0], "removed_text": duplicates._clip(texts[removed][1])})
    pj = c["pair_jaccard"]
    return {"method": "minhash", "method_reason": why, **summary,
            "minhash": {**mh, "detection_probability_at_threshold": round(float(minhash.detection_probability(
                mh["threshold"], mh["bands"], mh["rows_per_band"])), 4)},
            "candidate_pairs": int(c["candidate_pairs"]), "verified_pairs": int(c["verified_pairs"]),
            "pairs_checked_on_text": int(c["checked_pairs"]),
            "pair_jaccard": {"min": round(float(pj.min()), 4), "median": round(float(np.median(pj)), 4)} if len(pj)
            else None,
            "examples": examples}


def example_positions(c: dict[str, Any], section: dict[str, Any]) -> set[int]:
    return {int(p) for i in minhash.iter_sample(c["examples"], c["example_jaccard"], section["sample_pairs"])
            for p in c["examples"][i]}


def apply(in_path: str, section: dict[str, Any], out_path: str, *, why: str, tally: Any,
          clusters_path: str | None = None,
          digests: np.ndarray | None = None) -> tuple[dict[str, Any], int, np.ndarray]:
    """The dedupe job on the MinHash path: exact keep mask, the clusters (from minhash_cluster, or
    computed here with dataset.shards = 1), then one streamed pass that writes the kept rows and
    collects the report's example texts. tally: the stage's SourceTally. Returns the report, the
    kept rows' tokens and the verified pairs' Jaccard estimates (the histogram's)."""
    import tempfile
    from pathlib import Path

    total = batches.num_rows(in_path)
    alive, first = exact_keep(in_path, section, digests)
    with tempfile.TemporaryDirectory(dir=Path(out_path).parent, prefix=".minhash-") as work:
        c = read_clusters(clusters_path or in_process(in_path, section, work, digests), total)
    keep = alive & c["near_keep"]
    exact_removed = np.flatnonzero(~alive)
    exact_sample = [(int(first[exact_removed[i]]), int(exact_removed[i])) for i in
                    duplicates.exact_pair_picks(len(exact_removed), min(10, section["sample_pairs"]))]
    wanted = example_positions(c, section) | {p for pair in exact_sample for p in pair}
    near_removed = alive & ~c["near_keep"]
    texts: dict[int, tuple[int, str, str]] = {}
    by_source: dict[str, int] = {}
    tokens_out = offset = 0
    with batches.ParquetSink(out_path, batches.schema(in_path)) as sink:
        for batch in batches.iter_batches(in_path):
            n = batch.num_rows
            for pos in (p for p in wanted if offset <= p < offset + n):
                one = batch.slice(pos - offset, 1)
                row = one.to_pylist()[0]
                texts[pos] = (int(row["id"]), f"{row['instruction']} || {row['output']}",
                              minhash.field_texts(one, section["field"])[0])
            mask = keep[offset:offset + n]
            tally.add(batch, mask)
            if "source" in batch.schema.names:
                gone = batch.column("source").to_numpy(zero_copy_only=False)[near_removed[offset:offset + n]]
                for name, k in zip(*np.unique(gone.astype(str), return_counts=True)):
                    by_source[str(name)] = by_source.get(str(name), 0) + int(k)
            kept = batches.take_mask(batch, mask)
            tokens_out += int(np.sum(kept.column("n_tokens").to_numpy()))
            sink.write(kept)
            offset += n
    out: dict[str, Any] = {"rows_in": total, "threshold": section["minhash"]["threshold"], "field": section["field"],
                           "exact_removed": int(len(exact_removed))}
    if section["exact"]:
        out["exact_pairs_sample"] = [{"similarity": 1.0, "kept_id": texts[a][0],
                                      "kept_text": duplicates._clip(texts[a][1]), "removed_id": texts[b][0],
                                      "removed_text": duplicates._clip(texts[b][1])} for a, b in exact_sample]
    out.update(report(c, alive, section, texts, why))
    out["near_removed_by_source"] = by_source or None
    out["rows_out"] = int(keep.sum())
    if out["rows_in"] != out["rows_out"] + out["exact_removed"] + out["near_removed"]:
        raise AssertionError(f"dedupe accounting is off: {out}")
    return out, tokens_out, c["pair_jaccard"]
