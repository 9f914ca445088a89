"""Near-duplicate removal with MinHash and locality-sensitive hashing, for rows by the million.

The embedding path (tunesmith.data.duplicates) compares meaning and suits thousands of rows; this one
compares word n-gram shingles and scales with the rows. Four steps, each a Snakemake job when
dataset.shards > 1 (all four in the dedupe job otherwise):

1. signatures: per shard of the rows, datasketch MinHash signatures of each row's word n-grams
   (dedupe.field, normalised as exact dedupe normalises it). A signature (permutations x uint32)
   is the only per-row state that leaves the job.
2. buckets: per group of LSH bands, rows whose band of the signature is equal share a bucket; each
   bucket gives candidate pairs (every member with the bucket's first row).
3. clusters: candidate pairs whose signatures agree on at least `threshold` of their permutations
   (the MinHash estimate of the shingle Jaccard similarity, datasketch's MinHash.jaccard; the
   exact value near the threshold) are verified; rows in order, a row is dropped when a verified
   pair links it to an earlier row that is kept: the embedding path's keep-first rule. Each kept
   row and the rows dropped for it form a cluster.
4. the dedupe job streams the rows once and drops the removed ones.

No step holds the rows' text: signatures are read band by band (buckets) or only for the rows in
a candidate pair (clusters), so memory grows with the duplicates, not with the rows.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from tunesmith.data.batches import iter_rows, shard_bounds
from tunesmith.data.duplicates import normalise
from tunesmith.errors import DataError

_WORD = re.compile(r"\w+")
_EMPTY = np.uint32(0xFFFFFFFF)  # datasketch's initial hash value: a row with no shingle keeps it
SCHEME = "affine32"  # datasketch 2's 32-bit permutations (its default since 2.0.0)


# ---------------------------------------------------------------- settings

def settings(section: dict[str, Any]) -> dict[str, Any]:
    """dedupe.minhash, checked: bands x rows_per_band must fit in the permutations."""
    mh = section["minhash"]
    if mh["bands"] * mh["rows_per_band"] > mh["permutations"]:
        raise DataError(f"dedupe.minhash: bands ({mh['bands']}) x rows_per_band ({mh['rows_per_band']}) = "
                        f"{mh['bands'] * mh['rows_per_band']} is more than permutations ({mh['permutations']})")
    return mh


def detection_probability(similarity: float | np.ndarray, bands: int, rows_per_band: int) -> Any:
    """The LSH S-curve: the chance a pair of this Jaccard similarity shares at least one band."""
    return 1.0 - (1.0 - np.asarray(similarity, dtype=float) ** rows_per_band) ** bands


def choose_method(section: dict[str, Any], rows: int) -> tuple[str, str]:
    """(method, why) for the rows near-dedupe compares (after exact dedupe)."""
    method = section["method"]
    if method != "auto":
        return method, f"dedupe.method is {method}"
    limit = section["auto_embedding_max_rows"]
    if rows <= limit:
        return "embedding", (f"auto: {rows} rows <= dedupe.auto_embedding_max_rows ({limit}): embeddings compare "
                             f"meaning and take about a minute per 10k rows on 2 CPU cores")
    return "minhash", (f"auto: {rows} rows > dedupe.auto_embedding_max_rows ({limit}): MinHash-LSH (word "
                       f"{section['minhash']['ngram']}-grams) scales with the rows, embeddings do not on CPU")


# ---------------------------------------------------------------- 1. signatures

def shingles(text: str, n: int) -> list[bytes]:
    """The word n-grams of a text (normalised like exact dedupe, punctuation dropped), as bytes for
    the hash; a text of fewer than n words is one shingle, an empty one none."""
    words = _WORD.findall(normalise(text))
    if len(words) <= n:
        return [" ".join(words).encode("utf-8")] if words else []
    return [" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)]


def _prototype(mh: dict[str, Any]) -> Any:
    """One empty datasketch MinHash to copy per row: the permutations are drawn once (seeded)."""
    import xxhash
    from datasketch import MinHash

    # xxh32 in place of datasketch's default sha1: same 32-bit range, several times faster per shingle.
    # The scheme is named: signatures written by one version must compare with the next one's.
    return MinHash(num_perm=mh["permutations"], seed=mh["seed"], hashfunc=xxhash.xxh32_intdigest, scheme=SCHEME)


def signatures(texts: Iterable[str], mh: dict[str, Any], prototype: Any = None) -> np.ndarray:
    """(rows x permutations) uint32 MinHash signatures; a row with no word is all 0xFFFFFFFF."""
    proto = prototype if prototype is not None else _prototype(mh)
    rows = []
    for text in texts:
        m = proto.copy()
        m.update_batch(shingles(text, mh["ngram"]))
        rows.append(m.hashvalues)
    if not rows:
        return np.zeros((0, mh["permutations"]), np.uint32)
    return np.asarray(rows, dtype=np.uint32)


def field_texts(batch: Any, fld: str) -> list[str]:
    """The dedupe field of an arrow batch (as tunesmith.data.duplicates.field_texts builds it)."""
    out = batch.column("output").to_pylist()
    if fld == "output":
        return out
    prompts = [f"{i}\n\n{x}" if x else i for i, x in
               zip(batch.column("instruction").to_pylist(), batch.column("input").to_pylist())]
    if fld == "instruction":
        return prompts
    return [f"{p}\n\n{o}" for p, o in zip(prompts, out)]


def shard_signatures(path: str, section: dict[str, Any], shard: int, shards: int) -> tuple[np.ndarray, dict[str, int]]:
    """Signatures of rows [start, stop) of a parquet file, read batch by batch (only its slice),
    filled into one array (4 x permutations bytes a row)."""
    from tunesmith.data.batches import num_rows

    mh = settings(section)
    total = num_rows(path)
    start, stop = shard_bounds(total, shards, shard)
    proto = _prototype(mh)
    sigs = np.empty((stop - start, mh["permutations"]), np.uint32)
    at = 0
    for b in iter_rows(path, ["instruction", "input", "output"], start=start, stop=stop):
        sigs[at:at + b.num_rows] = signatures(field_texts(b, section["field"]), mh, proto)
        at += b.num_rows
    return sigs, {"start": start, "stop": stop, "total": total}


def members(mh: dict[str, Any]) -> list[str]:
    """The arrays of a signature file: one per LSH band, then the permutations beyond the bands."""
    return [f"band_{j:03d}" for j in range(mh["bands"])] + ["rest"]


def member_columns(mh: dict[str, Any], name: str) -> slice:
    r, b = mh["rows_per_band"], mh["bands"]
    return slice(b * r, mh["permutations"]) if name == "rest" else slice(int(name[5:]) * r, (int(name[5:]) + 1) * r)


def write_signatures(path: str, sigs: np.ndarray, mh: dict[str, Any], **meta: int) -> None:
    """A signature file: an uncompressed npz with one (rows x rows_per_band) member per band, so a
    bucket job reads only its bands; written one member at a time (np.savez would first copy
    every band at once: the whole signature twice over)."""
    import zipfile

    from tunesmith import fileio

    with fileio.atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
        for name in members(mh):
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(sigs[:, member_columns(mh, name)]))
        for name, value in meta.items():
            with zf.open(f"{name}.npy", "w") as fh:
                np.lib.format.write_array(fh, np.asarray(value))


# ---------------------------------------------------------------- 2. buckets

def band_groups(bands: int, groups: int) -> list[list[int]]:
    """Bands split over the bucket jobs (contiguous, near equal)."""
    groups = max(1, min(groups, bands))
    return [list(range(bands * g // groups, bands * (g + 1) // groups)) for g in range(groups)]


def _band_keys(band: np.ndarray) -> np.ndarray:
    """One 64-bit key per row of a band: the band's uint32 values packed pairwise and folded with
    odd multipliers (a false merge of two distinct bands needs a 64-bit collision)."""
    keys = np.zeros(len(band), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(band.shape[1]):
            keys = keys * np.uint64(0x9E3779B97F4A7C15) + band[:, j].astype(np.uint64) + np.uint64(j + 1)
            keys ^= keys >> np.uint64(29)
    return keys


def bucket_pairs(band: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """(k x 2) candidate pairs (first row of a bucket, later member) of one band over all rows;
    rows not alive (exact duplicates, empty texts) are left out."""
    rows = np.flatnonzero(alive)
    keys = _band_keys(band[rows])
    order = np.argsort(keys, kind="stable")  # stable: within a bucket, rows stay in row order
    keys, rows = keys[order], rows[order]
    same = keys[1:] == keys[:-1]
    if not same.any():
        return np.zeros((0, 2), np.int64)
    starts = np.ones(len(keys), dtype=bool)
    starts[1:] = ~same
    first = rows[np.maximum.accumulate(np.where(starts, np.arange(len(keys)), 0))]
    members = ~starts
    return np.stack([first[members], rows[members]], axis=1).astype(np.int64)


def unique_pairs(pairs: np.ndarray) -> np.ndarray:
    if len(pairs) == 0:
        return np.zeros((0, 2), np.int64)
    return np.unique(pairs, axis=0)


def group_buckets(shard_paths: Sequence[str], mh: dict[str, Any], bands: Sequence[int],
                  alive: np.ndarray) -> np.ndarray:
    """The candidate pairs of some bands over every shard's signatures (read band by band)."""
    found = []
    for j in bands:
        parts = []
        for path in shard_paths:
            with np.load(path) as f:
                parts.append(f[f"band_{j:03d}"])
        band = np.concatenate(parts)
        if len(band) != len(alive):
            raise DataError(f"{shard_paths[0]} ...: the signature shards hold {len(band)} rows, the rows to dedupe "
                            f"are {len(alive)}: re-run the minhash_shard jobs")
        found.append(bucket_pairs(band, alive & ~(band == _EMPTY).all(axis=1)))
        del band, parts
    return unique_pairs(np.concatenate(found)) if found else np.zeros((0, 2), np.int64)


# ---------------------------------------------------------------- 3. clusters

def pair_agreement(shard_paths: Sequence[str], bounds: Sequence[tuple[int, int]], mh: dict[str, Any],
                   pairs: np.ndarray) -> np.ndarray:
    """estimated_jaccard of row pairs (global positions) over the signature shard files, one
    member (band) at a time: memory is a band of the rows in the pairs, not their whole signatures."""
    if not len(pairs):
        return np.zeros(0)
    needed = np.unique(pairs)
    at = np.searchsorted(needed, pairs)
    equal = np.zeros(len(pairs), dtype=np.int64)
    for name in members(mh):
        cols = member_columns(mh, name)
        values = np.empty((len(needed), cols.stop - cols.start), np.uint32)
        for path, (start, stop) in zip(shard_paths, bounds):
            lo, hi = np.searchsorted(needed, [start, stop])
            if hi > lo:
                with np.load(path) as f:
                    values[lo:hi] = f[name][needed[lo:hi] - start]
        for lo in range(0, len(pairs), 1 << 20):
            chunk = at[lo:lo + (1 << 20)]
            equal[lo:lo + (1 << 20)] += (values[chunk[:, 0]] == values[chunk[:, 1]]).sum(axis=1)
    return equal / mh["permutations"]


def texts_at(path: str, rows: np.ndarray, fld: str) -> list[str]:
    """The dedupe field of some rows (sorted positions) of a parquet file, in one streamed pass."""
    from tunesmith.data.batches import iter_batches

    out: list[str] = []
    offset = 0
    for batch in iter_batches(path, ["instruction", "input", "output"]):
        lo, hi = np.searchsorted(rows, [offset, offset + batch.num_rows])
        if hi > lo:
            out.extend(field_texts(batch.take(rows[lo:hi] - offset), fld))
        offset += batch.num_rows
    return out


def true_jaccard(texts_a: Sequence[str], texts_b: Sequence[str], n: int) -> np.ndarray:
    """The exact Jaccard similarity of the shingle sets of text pairs."""
    out = np.empty(len(texts_a))
    for i, (a, b) in enumerate(zip(texts_a, texts_b)):
        sa, sb = set(shingles(a, n)), set(shingles(b, n))
        out[i] = len(sa & sb) / len(sa | sb) if sa or sb else 1.0
    return out


def check_borderline(path: str, fld: str, mh: dict[str, Any], pairs: np.ndarray,
                     jaccard: np.ndarray) -> tuple[np.ndarray, int]:
    """Estimates within verify_margin of the threshold replaced by the pairs' exact Jaccard, read
    from the text of those rows only: the estimate errs both ways near the threshold (its standard
    deviation is sqrt(J(1-J)/permutations), 0.027 at 0.75 and 256), the exact value does not.
    Returns the Jaccard values and how many pairs were checked."""
    margin = mh["verify_margin"]
    near = np.flatnonzero(np.abs(jaccard - mh["threshold"]) < margin) if margin > 0 else np.zeros(0, np.int64)
    if not len(near):
        return jaccard, 0
    rows = np.unique(pairs[near])
    texts = texts_at(path, rows, fld)
    at = np.searchsorted(rows, pairs[near])
    out = jaccard.copy()
    out[near] = true_jaccard([texts[i] for i in at[:, 0]], [texts[i] for i in at[:, 1]], mh["ngram"])
    return out, len(near)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """The MinHash estimate of each row pair's Jaccard similarity: the share of equal permutations,
    datasketch's MinHash.jaccard in vector form (tests check the two agree), in chunks."""
    out = np.empty(len(sig_a))
    for lo in range(0, len(sig_a), 65536):
        out[lo:lo + 65536] = (sig_a[lo:lo + 65536] == sig_b[lo:lo + 65536]).mean(axis=1)
    return out


def clusters(n_rows: int, pairs: np.ndarray, alive: np.ndarray, jaccard: np.ndarray,
             threshold: float) -> dict[str, np.ndarray]:
    """Keep-first over the pairs at or above the threshold, as duplicates.greedy_keep does for the
    embedding path: rows in order, a row is dropped when a pair links it to an earlier row that is
    kept, and that row (the most similar, if several) is its root. Not connected components: a
    chain A~B~C would drop C for A while C may be far from A; at 10M synthetic rows that removed
    15,000 rows below the threshold to their kept row (precision 0.959). Returns keep (over all
    rows: False for near duplicates only), root (each row's kept row) and the verified pairs."""
    ok = jaccard >= threshold
    edges, sims = np.sort(pairs[ok], axis=1), jaccard[ok]
    root = np.arange(n_rows, dtype=np.int64)
    order = np.lexsort((-sims, edges[:, 1]))  # by the later row, most similar first
    dropped: dict[int, int] = {}
    # Every pair that ends at a row comes before the pairs that start from it, so an earlier row's
    # fate is settled when a later one asks.
    for a, b in zip(edges[order, 0].tolist(), edges[order, 1].tolist()):
        if b not in dropped and a not in dropped:
            dropped[b] = a
    keep = np.ones(n_rows, dtype=bool)
    if dropped:
        rows = np.fromiter(dropped.keys(), np.int64, len(dropped))
        keep[rows] = False
        root[rows] = np.fromiter(dropped.values(), np.int64, len(dropped))
    return {"keep": keep | ~alive, "root": root, "pairs": edges, "pair_jaccard": sims}


def cluster_summary(keep: np.ndarray, root: np.ndarray, alive: np.ndarray) -> dict[str, Any]:
    removed = alive & ~keep
    sizes = np.bincount(root[alive], minlength=len(root))
    sizes = sizes[sizes >= 2]
    hist = {str(k): int(v) for k, v in zip(*np.unique(np.minimum(sizes, 11), return_counts=True))}
    if "11" in hist:
        hist["11+"] = hist.pop("11")
    return {"clusters": int(len(sizes)), "near_removed": int(removed.sum()),
            "cluster_size_max": int(sizes.max()) if len(sizes) else 0,
            "cluster_size_mean": round(float(sizes.mean()), 3) if len(sizes) else 0.0,
            "cluster_sizes": hist}


def example_pairs(keep: np.ndarray, root: np.ndarray, alive: np.ndarray, n: int) -> np.ndarray:
    """Up to n (kept, removed) positions spread over the removed rows (the report's examples)."""
    removed = np.flatnonzero(alive & ~keep)
    if not len(removed) or n == 0:
        return np.zeros((0, 2), np.int64)
    picks = np.unique(np.linspace(0, len(removed) - 1, num=min(n, len(removed))).round().astype(int))
    return np.stack([root[removed[picks]], removed[picks]], axis=1)


def iter_sample(pairs: np.ndarray, jaccard: np.ndarray, n: int) -> Iterator[int]:
    """Indices of up to n pairs spread over the Jaccard range (lowest included: the borderline)."""
    if not len(pairs) or n == 0:
        return iter(())
    order = np.argsort(jaccard, kind="stable")
    return iter(order[np.unique(np.linspace(0, len(order) - 1, num=min(n, len(order))).round().astype(int))])
