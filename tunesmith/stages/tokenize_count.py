"""tokenize_count: Instruction, output and combined token counts with the model's fast tokenizer (or the tokenize_shard jobs' counts gathered)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith import fileio
from tunesmith.data import batches, plots, tokens
from tunesmith.data.accounting import stage_result
from tunesmith.data.batches import check_shards, read_shard_bounds
from tunesmith.result import Result
from tunesmith.stageio import StageIO

log = logging.getLogger("tunesmith.data")


def tokenize_count(raw_path: str, tokenizer_dir: str, section: dict[str, Any], counts_path: str,
                   stats_path: str, hist_path: str, *, tokenizer: Any = None, recipe: str = "",
                   shards: list[str] | None = None) -> Result:
    """shards: the tokenize_shard outputs in shard order (dataset.shards > 1): gathered into the
    same counts, stats and histogram, nothing counted here; none: count every row here."""
    import numpy as np

    if shards:
        return _gather_token_counts(raw_path, tokenizer_dir, shards, counts_path, stats_path, hist_path, recipe=recipe)
    t0 = time.perf_counter()
    tok = tokenizer if tokenizer is not None else tokens.load_counter(tokenizer_dir)
    t1 = time.perf_counter()
    total = batches.num_rows(raw_path)
    n_in, n_out, count_seconds = [], [], 0.0
    with batches.ParquetSink(counts_path) as sink:
        for batch in batches.iter_batches(raw_path, ["id", "instruction", "input", "output"]):
            frame = batch.to_pandas()
            t2 = time.perf_counter()
            counts = tokens.count_frame(frame, tok, section["batch_size"])
            count_seconds += time.perf_counter() - t2
            sink.write(counts)
            # int32 is plenty for one row's tokens and halves what is kept per row for the stats.
            n_in.append(counts["n_instruction_tokens"].to_numpy(np.int32))
            n_out.append(counts["n_output_tokens"].to_numpy(np.int32))
            if total > 50_000:
                log.info("tokenize_count: %d / %d rows", sink.rows, total)
        rows = sink.rows
    return _token_outputs(tokenizer_dir, n_in, n_out, rows, count_seconds, stats_path, hist_path, recipe=recipe,
                          load_seconds=t1 - t0, work_started=t1)



def _token_outputs(tokenizer_dir: str, n_in: list[Any], n_out: list[Any], rows: int, count_seconds: float,
                   stats_path: str, hist_path: str, *, recipe: str, load_seconds: float, work_started: float,
                   extra: dict[str, Any] | None = None) -> Result:
    """Stats JSON, histogram and Result of tokenize_count from every row's counts (per batch, in row order)."""
    counts = tokens.counts_arrays(np.concatenate(n_in) if n_in else np.zeros(0, np.int32),
                                  np.concatenate(n_out) if n_out else np.zeros(0, np.int32))
    stats = tokens.stats(counts)
    stats["tokenizer"] = str(tokenizer_dir)
    stats["count_seconds"] = round(count_seconds, 4)
    stats["rows_per_s"] = round(rows / count_seconds, 1) if count_seconds else None
    stats["tokens_per_s"] = round(int(counts["n_tokens"].sum()) / count_seconds, 1) if count_seconds else None
    fileio.write_json(stats_path, stats)
    plots.token_histogram({"instruction + input": counts["n_instruction_tokens"],
                           "output": counts["n_output_tokens"],
                           "combined": counts["n_tokens"]}, hist_path,
                          title=f"{recipe} token counts ({Path(str(tokenizer_dir)).name} tokenizer)".strip())
    log.info("tokenize_count: %d rows, %d tokens in %.2f s", rows, stats["combined"]["sum"], count_seconds)
    return stage_result({"rows_in": rows, "rows_out": rows, "tokens": stats["combined"]["sum"],
                    "tokens_instruction": stats["instruction"]["sum"], "tokens_output": stats["output"]["sum"],
                    "tokens_p95": stats["combined"]["p95"], "tokens_max": stats["combined"]["max"],
                    "count_seconds": count_seconds, "rows_per_s": stats["rows_per_s"] or 0,
                    "tokens_per_s": stats["tokens_per_s"] or 0, **(extra or {}),
                    "load_seconds": load_seconds, "work_seconds": time.perf_counter() - work_started},
                   stats_path, hist_path, summary=f"{rows} rows, {stats['combined']['sum']} tokens")



def _gather_token_counts(raw_path: str, tokenizer_dir: str, paths: list[str], counts_path: str, stats_path: str,
                         hist_path: str, *, recipe: str) -> Result:
    started = time.perf_counter()
    metas = [batches.file_metadata(p) for p in paths]
    check_shards(paths, [(*read_shard_bounds(p, m), batches.num_rows(p)) for p, m in zip(paths, metas)],
                 unit="counts", job="tokenize_shard", total=batches.num_rows(raw_path), source=raw_path)
    n_in, n_out = [], []
    with batches.ParquetSink(counts_path) as sink:
        for path in paths:
            for batch in batches.iter_batches(path):
                sink.write(batch)
                n_in.append(batch.column("n_instruction_tokens").to_numpy().astype(np.int32))
                n_out.append(batch.column("n_output_tokens").to_numpy().astype(np.int32))
        rows = sink.rows
    count_seconds = sum(float(m.get("count_seconds", 0.0)) for m in metas)  # the shard jobs' own, summed
    return _token_outputs(tokenizer_dir, n_in, n_out, rows, count_seconds, stats_path, hist_path, recipe=recipe,
                          load_seconds=0.0, work_started=started, extra={"shards": len(paths)})


def run(io: StageIO) -> Result:
    return tokenize_count(io.input["raw"], io.input["tokenizer"], io.section["tokenize"], io.output["counts"],
                          io.output["stats"], io.output["hist"], recipe=io.recipe, shards=io.many("shards"))
