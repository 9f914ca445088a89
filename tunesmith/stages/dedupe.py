"""dedupe: Exact dedupe (normalised text digests), then optional near-dedupe (embedding similarity)."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from tunesmith import fileio, settings
from tunesmith.data import batches, duplicates, load, minhash, minhash_jobs, plots
from tunesmith.data.accounting import SourceTally, by_source, source_metrics, stage_result
from tunesmith.data.duplicates import gather_digests, gather_embeddings
from tunesmith.result import Result
from tunesmith.stageio import StageIO

log = logging.getLogger("tunesmith.data")


def dedupe(in_path: str, section: dict[str, Any], out_path: str, report_path: str, hist_path: str, *,
           offline: bool, model: Any = None, recipe: str = "", embeddings: list[str] | None = None,
           digests: list[str] | None = None, clusters: str | None = None) -> Result:
    """embeddings: the embed_shard outputs in shard order (dataset.shards > 1); none: embed here.
    digests: the filter_shard jobs' row digests in shard order (dataset.shards > 1); none: hash here.
    clusters: minhash_cluster's output (dataset.shards > 1, method minhash or auto); none: MinHash
    runs here when the method is (or auto picks) minhash."""
    started = time.perf_counter()
    row_digests = gather_digests(digests, in_path) if digests else None
    method, why = None, ""
    if section["near"]:
        rows = None
        if section["method"] == "auto":  # the rows near-dedupe would compare: after exact dedupe
            rows = int(minhash_jobs.exact_keep(in_path, section, row_digests)[0].sum())
        method, why = minhash.choose_method(section, rows or 0)
    nn_title = "nearest-neighbour similarity"
    if method == "minhash":
        tally = SourceTally()
        report, tokens_out, nn_sim = minhash_jobs.apply(in_path, section, out_path, why=why, tally=tally,
                                                         clusters_path=clusters, digests=row_digests)
        report["rows_by_source"] = tally.result()
        nn_title = "MinHash Jaccard estimate of the clustered pairs"
    elif method == "embedding":  # the embeddings need every row at once
        frame = load.read_rows(in_path)
        vectors = gather_embeddings(embeddings) if embeddings else None
        kept, report, nn_sim = duplicates.run(frame, section, offline=offline, model=model,
                                              progress=len(frame) > 2000, vectors=vectors, digests=row_digests)
        if embeddings:
            report["embedding_shards"] = len(embeddings)
        report.update({"method": "embedding", "method_reason": why})
        report["rows_by_source"] = by_source(frame, kept)
        fileio.write_parquet(out_path, kept)
        tokens_out = int(kept["n_tokens"].sum())
    else:
        report, tokens_out = _exact_dedupe_stream(in_path, section, out_path, row_digests)
        nn_sim = np.zeros(0)
    if digests:
        report["digest_shards"] = len(digests)
    fileio.write_json(report_path, {**report, "settings": section})
    plots.similarity_histogram(nn_sim, report["threshold"] if section["near"] else None, hist_path,
                               title=f"{recipe} {report['field']} {nn_title}".strip())
    load_seconds = report.get("model_load_seconds", 0.0)
    log.info("dedupe: %d -> %d rows (exact %d, near %d at %.2f)", report["rows_in"], report["rows_out"],
             report["exact_removed"], report["near_removed"], report["threshold"])
    return stage_result({"rows_in": report["rows_in"], "rows_out": report["rows_out"],
                    "exact_removed": report["exact_removed"], "near_removed": report["near_removed"],
                    "threshold": report["threshold"], "embed_seconds": report.get("embed_seconds", 0.0),
                    "embed_rows_per_s": report.get("embed_rows_per_s") or 0.0,
                    "search_seconds": report.get("search_seconds", 0.0), "tokens": tokens_out,
                    **source_metrics(report["rows_by_source"]),
                    "load_seconds": load_seconds, "work_seconds": time.perf_counter() - started - load_seconds},
                   report_path, hist_path,
                   summary=f"{report['rows_in']} -> {report['rows_out']} rows (exact {report['exact_removed']}, "
                           f"near {report['near_removed']})")



def _exact_dedupe_stream(in_path: str, section: dict[str, Any], out_path: str,
                         digests: Any = None) -> tuple[dict[str, Any], int]:
    """Exact dedupe in two passes over the batches: a 16-byte digest per row, the first row of each
    digest found by sorting them (dedupe.first_occurrences), then the kept rows streamed out. The
    same rows, pairs and report as dedupe.run with near off. digests: those of every row, hashed by
    the filter shard jobs (gather_digests); the first pass is then skipped."""
    if digests is None:
        digests = duplicates.file_digests(in_path)
    rows_in = len(digests)
    report: dict[str, Any] = {"rows_in": rows_in, "threshold": section["threshold"], "field": section["field"]}
    if section["exact"]:
        keep, first = duplicates.first_occurrences(digests)
        removed = np.flatnonzero(~keep)
        sample = [(int(first[removed[i]]), int(removed[i])) for i in
                  duplicates.exact_pair_picks(len(removed), min(10, section["sample_pairs"]))]
    else:
        keep, removed, sample = np.ones(rows_in, dtype=bool), np.zeros(0, np.int64), []
    del digests
    wanted = {pos for pair in sample for pos in pair}
    texts: dict[int, tuple[int, str]] = {}
    tally = SourceTally()
    tokens_out = offset = 0
    with batches.ParquetSink(out_path, batches.schema(in_path)) as sink:
        for batch in batches.iter_batches(in_path):
            mask = keep[offset:offset + batch.num_rows]
            for pos in (p for p in wanted if offset <= p < offset + batch.num_rows):
                row = batch.slice(pos - offset, 1).to_pylist()[0]
                texts[pos] = (int(row["id"]), f"{row['instruction']} || {row['output']}")
            tally.add(batch, mask)
            kept = batches.take_mask(batch, mask)
            tokens_out += int(np.sum(kept.column("n_tokens").to_numpy()))
            sink.write(kept)
            offset += batch.num_rows
    report["exact_removed"] = int(len(removed))
    if section["exact"]:
        report["exact_pairs_sample"] = [{"similarity": 1.0, "kept_id": texts[a][0], "kept_text": duplicates._clip(texts[a][1]),
                                         "removed_id": texts[b][0], "removed_text": duplicates._clip(texts[b][1])}
                                        for a, b in sample]
    report["near_removed"] = 0
    report["rows_out"] = int(keep.sum())
    report["rows_by_source"] = tally.result()
    return report, tokens_out


def run(io: StageIO) -> Result:
    return dedupe(io.input["filtered"], io.section["dedupe"], io.output["deduped"], io.output["report"],
                  io.output["hist"], offline=settings.offline(), recipe=io.recipe,
                  embeddings=io.many("embeddings"), digests=io.many("digests"), clusters=io.one("clusters"))
