"""embed_shard: Embed one shard of the rows that survive exact dedupe, for near-dedupe (dataset.shards > 1)."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd

from tunesmith import fileio, settings
from tunesmith.data import batches, duplicates, minhash_jobs
from tunesmith.data.accounting import stage_result
from tunesmith.data.duplicates import gather_digests
from tunesmith.result import Result
from tunesmith.stageio import StageIO

log = logging.getLogger("tunesmith.data")


def embed_shard(in_path: str, section: dict[str, Any], shard: int, shards: int, out_path: str, *,
                offline: bool, model: Any = None, digests: list[str] | None = None) -> Result:
    """One of dataset.shards embedding jobs of near-dedupe (shard is 0-based); dedupe gathers them.
    Its slice is of the rows after exact dedupe (kept positions from the digests: the filter shard
    jobs', or hashed here batch by batch), and only the row groups holding it are read.
    digests: the filter_shard jobs' row digests (exact dedupe then hashes nothing here)."""
    started = time.perf_counter()
    keep, _ = minhash_jobs.exact_keep(in_path, section, gather_digests(digests, in_path) if digests else None)
    kept = np.flatnonzero(keep)
    start, stop = batches.shard_bounds(len(kept), shards, shard)
    parts = []
    if stop > start:
        lo, hi = int(kept[start]), int(kept[stop - 1]) + 1
        for batch in batches.iter_rows(in_path, ["id", "instruction", "input", "output"], start=lo, stop=hi):
            parts.append(batches.take_mask(batch, keep[lo:lo + batch.num_rows]).to_pandas())
            lo += batch.num_rows
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["instruction", "input", "output"])
    texts = duplicates.field_texts(frame, section["field"])
    t_load = time.perf_counter()
    if model is None:
        model = duplicates.load_embedder(section["model"], offline=offline, device=section["device"])
    load_seconds = time.perf_counter() - t_load
    t_embed = time.perf_counter()
    vectors = duplicates.embed(model, texts, section["batch_size"], len(texts) > 2000) if texts else \
        np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
    embed_seconds = time.perf_counter() - t_embed
    rate = round(len(texts) / embed_seconds, 1) if texts and embed_seconds else None
    # the slice's place travels with it, so the gather can tell a stale or misplaced shard
    fileio.write_npz(out_path, vectors=vectors, start=start, stop=stop, total=len(kept))
    log.info("embed_shard %d/%d: rows %d..%d of %d at %s rows/s", shard + 1, shards, start, stop, len(kept), rate)
    return stage_result({"rows": len(texts), "rows_total": len(kept), "shard": shard, "shards": shards,
                         "embed_seconds": round(embed_seconds, 3), "embed_rows_per_s": rate or 0.0,
                         "load_seconds": load_seconds, "work_seconds": time.perf_counter() - started - load_seconds},
                        summary=f"shard {shard + 1}/{shards}: {len(texts)} rows embedded")

def run(io: StageIO) -> Result:
    shard, shards = io.shard_of()
    return embed_shard(io.input["filtered"], io.section["dedupe"], shard, shards, io.output["embeddings"],
                       offline=settings.offline(), digests=io.many("digests"))
