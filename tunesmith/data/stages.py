"""The data stages as functions of paths: read inputs, do the work, write outputs atomically,
return a Result (tunesmith.result). scripts/<rule>.py hands each to the runner, which records it;
bench/ and tests call them directly.

Every Result's metrics hold ``load_seconds`` (tokenizer / model load), ``work_seconds`` (the
rest) and ``seconds`` (both), so start-up and work can be told apart, and ``peak_rss_mb``: the
process's peak resident memory when the stage ended (its own under Snakemake, one job per process).

The per-row stages read and write parquet one batch at a time (tunesmith.data.batches), so their
memory does not grow with the rows: what they keep whole is a few numbers per row (token counts,
a 16-byte digest for exact dedupe, the positions select keeps; MinHash near-dedupe keeps a
signature a row, in its shard jobs' files). Two paths still hold every row: near-dedupe by
embedding (the embeddings need them) and a weighted mixture (download reads each source
whole to cap and tag it; format resamples the train rows in memory).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith import fileio
from tunesmith.errors import DataError
from tunesmith.result import Result
from tunesmith.data import batches
from tunesmith.data import dedupe as dedupe_mod
from tunesmith.data import minhash as minhash_mod
from tunesmith.data import minhash_stages
from tunesmith.data import filters, formatting, load, plots, tokens
from tunesmith.data import select as select_mod

log = logging.getLogger("tunesmith.data")


class SourceTally:
    """by_source() accumulated batch by batch: rows per source in and out of a stage."""

    def __init__(self) -> None:
        self.rows_in: dict[str, int] = {}
        self.rows_out: dict[str, int] = {}
        self.seen = False

    @staticmethod
    def _add(into: dict[str, int], values: Any) -> None:
        for name, n in pd_value_counts(values).items():
            into[str(name)] = into.get(str(name), 0) + int(n)

    def add(self, batch: Any, keep: Any = None) -> None:
        """batch: an arrow batch (its `source` column, when it has one); keep: the mask of the rows kept."""
        if "source" not in batch.schema.names:
            return
        self.seen = True
        values = batch.column("source").to_numpy(zero_copy_only=False)
        self._add(self.rows_in, values)
        self._add(self.rows_out, values if keep is None else values[keep])

    def state(self) -> dict[str, Any]:
        return {"seen": self.seen, "in": dict(self.rows_in), "out": dict(self.rows_out)}

    def absorb(self, state: dict[str, Any]) -> None:
        """Add a shard's state(); in shard order the sources keep the order a single pass meets them in."""
        self.seen = self.seen or bool(state["seen"])
        for into, counts in ((self.rows_in, state["in"]), (self.rows_out, state["out"])):
            for name, n in counts.items():
                into[name] = into.get(name, 0) + int(n)

    def result(self) -> dict[str, dict[str, int]] | None:
        if not self.seen:
            return None
        return {name: {"in": n, "out": self.rows_out.get(name, 0)} for name, n in self.rows_in.items()}


def pd_value_counts(values: Any) -> Any:
    import pandas as pd

    return pd.Series(values).value_counts(sort=False)


def by_source(before: Any, after: Any) -> dict[str, dict[str, int]] | None:
    """Rows per source of a mixture in and out of a stage (None for a single source)."""
    if "source" not in getattr(after, "columns", ()):
        return None
    counts_in, counts_out = before["source"].value_counts(), after["source"].value_counts()
    return {str(name): {"in": int(counts_in.get(name, 0)), "out": int(counts_out.get(name, 0))}
            for name in counts_in.index}


def _source_metrics(per_source: dict[str, dict[str, int]] | None) -> dict[str, int]:
    return {f"rows_out.{name}": c["out"] for name, c in (per_source or {}).items()}


def _result(metrics: dict[str, Any], *artifacts: str, summary: str = "") -> Result:
    metrics["seconds"] = metrics["load_seconds"] + metrics["work_seconds"]
    metrics["peak_rss_mb"] = batches.peak_rss_mb()
    return Result(metrics=metrics, artifacts=[str(a) for a in artifacts], summary=summary)


def download(section: dict[str, Any], raw_path: str, source_path: str, *, offline: bool,
             cache_dir: str = "resources/downloads") -> Result:
    started = time.perf_counter()
    if section["sources"]:
        loaded = load.load_mixture(section, offline=offline, cache_dir=cache_dir)
        fileio.write_parquet(raw_path, loaded.frame)
        info = dict(loaded.info)
    else:
        info = load.load_to_parquet(section, raw_path, offline=offline, cache_dir=cache_dir)
    info["raw_sha256"] = fileio.sha256(raw_path)
    info["changed_since_last_download"] = _compare_with_last(Path(source_path).parent / HISTORY, info)
    fileio.write_json(source_path, info)
    skipped = info["skipped"]
    log.info("download: %d rows from %s (%d skipped: %s)", info["rows"], info["origin"], skipped["count"],
             skipped["by_reason"])
    metrics = {"rows_in": info["records_read"], "rows_out": info["rows"], "skipped": skipped["count"],
               **{f"rows_out.{name}": n for name, n in (info.get("rows_by_source") or {}).items()},
               **{f"skipped_{k}": v for k, v in skipped["by_reason"].items()},
               "load_seconds": 0.0, "work_seconds": time.perf_counter() - started}
    return _result(metrics, source_path, summary=f"{info['rows']} rows from {info['origin']} "
                                                 f"({skipped['count']} skipped)")


HISTORY = ".download_history.jsonl"


def _compare_with_last(history: Path, info: dict[str, Any]) -> dict[str, Any] | None:
    """What a hub id or URL returned can change between runs without any file here changing.
    Each download appends what it read to a history beside its outputs (not an output: Snakemake
    deletes those before the job runs); a different result from the same origin is said aloud
    and recorded in source.json."""
    import json

    entry = {k: info.get(k) for k in ("origin", "revision", "sha256", "raw_sha256", "rows")}
    entry["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    last = None
    if history.is_file():
        for line in history.read_text(encoding="utf-8").splitlines():
            with_origin = json.loads(line)
            if with_origin.get("origin") == entry["origin"]:
                last = with_origin
    history.parent.mkdir(parents=True, exist_ok=True)
    with history.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
    if last is None or last["raw_sha256"] == entry["raw_sha256"]:
        return None
    change = {"previous_time": last["time"], "previous_raw_sha256": last["raw_sha256"],
              "previous_rows": last["rows"], "previous_revision": last["revision"]}
    log.warning("dataset %s changed since the download of %s: %s rows -> %s, raw sha256 %s -> %s",
                entry["origin"], last["time"], last["rows"], entry["rows"], last["raw_sha256"][:12],
                entry["raw_sha256"][:12])
    return change


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
    return _result({"rows_in": rows, "rows_out": rows, "tokens": stats["combined"]["sum"],
                    "tokens_instruction": stats["instruction"]["sum"], "tokens_output": stats["output"]["sum"],
                    "tokens_p95": stats["combined"]["p95"], "tokens_max": stats["combined"]["max"],
                    "count_seconds": count_seconds, "rows_per_s": stats["rows_per_s"] or 0,
                    "tokens_per_s": stats["tokens_per_s"] or 0, **(extra or {}),
                    "load_seconds": load_seconds, "work_seconds": time.perf_counter() - work_started},
                   stats_path, hist_path, summary=f"{rows} rows, {stats['combined']['sum']} tokens")


# ---------------------------------------------------------------- shards (dataset.shards > 1)
# Every shard job works on rows [start, stop) of its input as batches.shard_bounds cuts them, and
# records those bounds beside its output; the gathering job checks that its shards meet end to end
# over the input it reads, so a stale or misplaced shard is named, never silently mixed in.

def _bounds(start: int, stop: int, total: int) -> dict[str, str]:
    return {"shard_start": str(start), "shard_stop": str(stop), "shard_total": str(total)}


def _read_bounds(path: str, meta: dict[str, Any]) -> tuple[int, int, int]:
    try:
        return int(meta["shard_start"]), int(meta["shard_stop"]), int(meta["shard_total"])
    except KeyError:
        raise DataError(f"{path}: not a shard file (no shard bounds in it): re-run its shard job") from None


def check_shards(paths: list[str], bounds: list[tuple[int, int, int, int]], *, unit: str, job: str,
                 total: int | None = None, source: str = "") -> None:
    """bounds: per shard file (start, stop, rows of the input it was cut from, rows it holds). The
    shards must hold consecutive slices of one input of `total` rows (when given), start to end."""
    stop, seen_total = 0, total
    for shard, (path, (start, end, rows, held)) in enumerate(zip(paths, bounds)):
        seen_total = rows if seen_total is None else seen_total
        if start != stop or rows != seen_total or held != end - start:
            raise DataError(f"{path}: shard {shard + 1} of {len(paths)} holds rows {start}..{end} of {rows} "
                            f"({held} {unit}), expected rows from {stop} of {seen_total}"
                            f"{' (' + source + ')' if source else ''}: re-run its {job} job")
        stop = end
    if seen_total is not None and paths and stop != seen_total:
        raise DataError(f"{paths[-1]}: the shards end at row {stop} of {seen_total}: a shard job is missing")


def tokenize_shard(raw_path: str, tokenizer_dir: str, section: dict[str, Any], shard: int, shards: int,
                   out_path: str, *, tokenizer: Any = None) -> Result:
    """One of dataset.shards token-counting jobs (shard is 0-based): the counts of rows
    [start, stop) of raw_path, read batch by batch; tokenize_count gathers them."""
    t0 = time.perf_counter()
    tok = tokenizer if tokenizer is not None else tokens.load_counter(tokenizer_dir)
    t1 = time.perf_counter()
    total = batches.num_rows(raw_path)
    start, stop = batches.shard_bounds(total, shards, shard)
    count_seconds = 0.0
    with batches.ParquetSink(out_path, tokens.counts_schema(), metadata=_bounds(start, stop, total)) as sink:
        for batch in batches.iter_rows(raw_path, ["id", "instruction", "input", "output"], start=start, stop=stop):
            t2 = time.perf_counter()
            counts = tokens.count_frame(batch.to_pandas(), tok, section["batch_size"])
            count_seconds += time.perf_counter() - t2
            sink.write(counts)
            if stop - start > 50_000:
                log.info("tokenize_shard %d/%d: %d / %d rows", shard + 1, shards, sink.rows, stop - start)
        sink.metadata["count_seconds"] = repr(count_seconds)
        rows = sink.rows
    rate = round(rows / count_seconds, 1) if count_seconds else 0.0
    log.info("tokenize_shard %d/%d: rows %d..%d of %d at %s rows/s", shard + 1, shards, start, stop, total, rate)
    return _result({"rows": rows, "rows_total": total, "shard": shard, "shards": shards,
                    "count_seconds": count_seconds, "rows_per_s": rate,
                    "load_seconds": t1 - t0, "work_seconds": time.perf_counter() - t1},
                   summary=f"shard {shard + 1}/{shards}: {rows} rows counted")


def _gather_token_counts(raw_path: str, tokenizer_dir: str, paths: list[str], counts_path: str, stats_path: str,
                         hist_path: str, *, recipe: str) -> Result:
    started = time.perf_counter()
    metas = [batches.file_metadata(p) for p in paths]
    check_shards(paths, [(*_read_bounds(p, m), batches.num_rows(p)) for p, m in zip(paths, metas)],
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


def filter_rows(raw_path: str, counts_path: str, section: dict[str, Any], out_path: str,
                report_path: str) -> Result:
    """Batch by batch: each raw batch gets its rows' counts (by id) and the rules' masks; the kept
    rows stream out. The one check that needs every row (a rule left none) runs at the end, before
    the output is put in place."""
    started = time.perf_counter()
    counts = tokens.CountIndex(counts_path)
    tally = SourceTally()
    acc = filters.Accounting()
    with batches.ParquetSink(out_path) as sink:
        for batch in batches.iter_batches(raw_path):
            sink.write(_filter_batch(batch, counts, section, acc, tally))
        report = acc.report()
    return _filter_report(report, tally, section, report_path, started)


def _filter_batch(batch: Any, counts: Any, section: dict[str, Any], acc: Any, tally: "SourceTally") -> Any:
    """One raw batch with its counts attached, less the rows a rule drops (counted in acc and tally)."""
    batch = counts.attach(batch)
    frame = batch.drop_columns(["messages"]).to_pandas() if "messages" in batch.schema.names \
        else batch.to_pandas()
    alive = acc.add(frame, filters.rules(section, frame))
    tally.add(batch, alive)
    return batches.take_mask(batch, alive)


def _filter_report(report: dict[str, Any], tally: "SourceTally", section: dict[str, Any], report_path: str,
                   started: float, extra: dict[str, Any] | None = None) -> Result:
    report["rows_by_source"] = tally.result()
    fileio.write_json(report_path, {**report, "settings": section})
    log.info("filter: %d -> %d rows; drops %s", report["rows_in"], report["rows_out"], report["drops"])
    return _result({"rows_in": report["rows_in"], "rows_out": report["rows_out"], "dropped": report["dropped"],
                    **{f"drop_{k.replace(':', '_')}": v for k, v in report["drops"].items()},
                    "tokens": report["tokens_out"], "load_seconds": 0.0, **_source_metrics(report["rows_by_source"]),
                    **(extra or {}), "work_seconds": time.perf_counter() - started},
                   report_path, summary=f"{report['rows_in']} -> {report['rows_out']} rows; drops {report['drops']}")


def _filtered_schema(raw_path: str) -> Any:
    """The schema filter writes: raw's columns, then the count columns (as CountIndex.attach makes them)."""
    import pyarrow as pa

    raw = batches.schema(raw_path)
    return pa.schema([pa.field(f.name, f.type) for f in raw if f.name not in tokens.COUNT_COLUMNS] +
                     [pa.field(c, pa.int64()) for c in tokens.COUNT_COLUMNS])


def filter_shard(raw_path: str, counts_path: str, section: dict[str, Any], shard: int, shards: int, out_path: str,
                 report_path: str, digests_path: str) -> Result:
    """One of dataset.shards filter jobs (shard is 0-based): rows [start, stop) of raw_path with the
    counts of its tokenize_shard job (counts_path), streamed through the rules. Writes the kept rows,
    the shard's drops by reason (report_path: summed and checked by the filter job, which gathers
    the shards) and the kept rows' exact-dedupe digests (digests_path: gathered by dedupe, which
    then hashes nothing)."""
    started = time.perf_counter()
    total = batches.num_rows(raw_path)
    start, stop = batches.shard_bounds(total, shards, shard)
    have = _read_bounds(counts_path, batches.file_metadata(counts_path))
    if have != (start, stop, total):
        raise DataError(f"{counts_path}: token counts of rows {have[0]}..{have[1]} of {have[2]}, filter shard "
                        f"{shard + 1}/{shards} reads rows {start}..{stop} of {total} of {raw_path}: re-run its "
                        f"tokenize_shard job")
    counts = tokens.CountIndex(counts_path)
    tally = SourceTally()
    acc = filters.Accounting()
    digests = []
    with batches.ParquetSink(out_path, _filtered_schema(raw_path), metadata=_bounds(start, stop, total)) as sink:
        for batch in batches.iter_rows(raw_path, start=start, stop=stop):
            kept = _filter_batch(batch, counts, section, acc, tally)
            digests.append(dedupe_mod.row_digests(kept.column("instruction").to_pylist(),
                                                  kept.column("input").to_pylist(), kept.column("output").to_pylist()))
            sink.write(kept)
        digests = np.concatenate(digests) if digests else np.zeros((0, 2), np.uint64)
        fileio.write_npz(digests_path, digests=digests, start=start, stop=stop, total=total)
        fileio.write_json(report_path, {"shard": shard + 1, "shards": shards, **_bounds(start, stop, total),
                                        "accounting": acc.state(), "rows_by_source": tally.state()})
    log.info("filter_shard %d/%d: rows %d..%d of %d: %d kept; drops %s", shard + 1, shards, start, stop, total,
             acc.rows_out, acc.drops)
    return _result({"rows_in": acc.rows_in, "rows_out": acc.rows_out, "shard": shard, "shards": shards,
                    "load_seconds": 0.0, "work_seconds": time.perf_counter() - started},
                   summary=f"shard {shard + 1}/{shards}: {acc.rows_in} -> {acc.rows_out} rows")


def gather_filtered(raw_path: str, counts_path: str, parts: list[str], reports: list[str], section: dict[str, Any],
                    out_path: str, report_path: str) -> Result:
    """The filter job with dataset.shards > 1: the filter_shard outputs (kept rows and reports, in
    shard order) checked to cover raw_path end to end, their drops summed (the report a single
    pass writes, "a rule left no rows" checked over all of them), their rows concatenated."""
    import json

    started = time.perf_counter()
    if len(parts) != len(reports):
        raise DataError(f"filter: {len(parts)} shard row files but {len(reports)} shard reports")
    states = [json.loads(Path(p).read_text(encoding="utf-8")) for p in reports]
    check_shards(reports, [(*_read_bounds(p, st), st["accounting"]["rows_in"]) for p, st in zip(reports, states)],
                 unit="rows", job="filter_shard", total=batches.num_rows(raw_path), source=raw_path)
    counted = batches.num_rows(counts_path)
    if counted != batches.num_rows(raw_path):
        raise DataError(f"{counts_path}: token counts of {counted} rows, {raw_path} holds {batches.num_rows(raw_path)}: "
                        f"re-run tokenize_count")
    acc, tally = filters.Accounting(), SourceTally()
    for path, part, state in zip(reports, parts, states):
        if batches.num_rows(part) != state["accounting"]["rows_out"]:
            raise DataError(f"{part}: {batches.num_rows(part)} rows, its report {path} kept "
                            f"{state['accounting']['rows_out']}: re-run its filter_shard job")
        acc.absorb(state["accounting"])
        tally.absorb(state["rows_by_source"])
    report = acc.report()  # before any row is written: a rule that left none stops here
    with batches.ParquetSink(out_path, batches.schema(parts[0]) if parts else None) as sink:
        for part in parts:
            for batch in batches.iter_batches(part):
                sink.write(batch)
    return _filter_report(report, tally, section, report_path, started, extra={"shards": len(parts)})


def embed_shard(in_path: str, section: dict[str, Any], shard: int, shards: int, out_path: str, *,
                offline: bool, model: Any = None, digests: list[str] | None = None) -> Result:
    """One of dataset.shards embedding jobs of near-dedupe (shard is 0-based); dedupe gathers them.
    Its slice is of the rows after exact dedupe (kept positions from the digests: the filter shard
    jobs', or hashed here batch by batch), and only the row groups holding it are read.
    digests: the filter_shard jobs' row digests (exact dedupe then hashes nothing here)."""
    started = time.perf_counter()
    keep, _ = minhash_stages.exact_keep(in_path, section, gather_digests(digests, in_path) if digests else None)
    kept = np.flatnonzero(keep)
    start, stop = batches.shard_bounds(len(kept), shards, shard)
    parts = []
    if stop > start:
        lo, hi = int(kept[start]), int(kept[stop - 1]) + 1
        for batch in batches.iter_rows(in_path, ["id", "instruction", "input", "output"], start=lo, stop=hi):
            parts.append(batches.take_mask(batch, keep[lo:lo + batch.num_rows]).to_pandas())
            lo += batch.num_rows
    import pandas as pd

    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["instruction", "input", "output"])
    texts = dedupe_mod.field_texts(frame, section["field"])
    t_load = time.perf_counter()
    if model is None:
        model = dedupe_mod.load_embedder(section["model"], offline=offline, device=section["device"])
    load_seconds = time.perf_counter() - t_load
    t_embed = time.perf_counter()
    vectors = dedupe_mod.embed(model, texts, section["batch_size"], len(texts) > 2000) if texts else \
        np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
    embed_seconds = time.perf_counter() - t_embed
    rate = round(len(texts) / embed_seconds, 1) if texts and embed_seconds else None
    # the slice's place travels with it, so the gather can tell a stale or misplaced shard
    fileio.write_npz(out_path, vectors=vectors, start=start, stop=stop, total=len(kept))
    log.info("embed_shard %d/%d: rows %d..%d of %d at %s rows/s", shard + 1, shards, start, stop, len(kept), rate)
    return _result({"rows": len(texts), "rows_total": len(kept), "shard": shard, "shards": shards,
                    "embed_seconds": round(embed_seconds, 3), "embed_rows_per_s": rate or 0.0,
                    "load_seconds": load_seconds, "work_seconds": time.perf_counter() - started - load_seconds},
                   summary=f"shard {shard + 1}/{shards}: {len(texts)} rows embedded")


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
            rows = int(minhash_stages.exact_keep(in_path, section, row_digests)[0].sum())
        method, why = minhash_mod.choose_method(section, rows or 0)
    nn_title = "nearest-neighbour similarity"
    if method == "minhash":
        tally = SourceTally()
        report, tokens_out, nn_sim = minhash_stages.apply(in_path, section, out_path, why=why, tally=tally,
                                                           clusters_path=clusters, digests=row_digests)
        report["rows_by_source"] = tally.result()
        nn_title = "MinHash Jaccard estimate of the clustered pairs"
    elif method == "embedding":  # the embeddings need every row at once
        frame = load.read_rows(in_path)
        vectors = gather_embeddings(embeddings) if embeddings else None
        kept, report, nn_sim = dedupe_mod.run(frame, section, offline=offline, model=model,
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
    return _result({"rows_in": report["rows_in"], "rows_out": report["rows_out"],
                    "exact_removed": report["exact_removed"], "near_removed": report["near_removed"],
                    "threshold": report["threshold"], "embed_seconds": report.get("embed_seconds", 0.0),
                    "embed_rows_per_s": report.get("embed_rows_per_s") or 0.0,
                    "search_seconds": report.get("search_seconds", 0.0), "tokens": tokens_out,
                    **_source_metrics(report["rows_by_source"]),
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
        digests = [dedupe_mod.row_digests(b.column("instruction").to_pylist(), b.column("input").to_pylist(),
                                          b.column("output").to_pylist())
                   for b in batches.iter_batches(in_path, ["instruction", "input", "output"])]
        digests = np.concatenate(digests) if digests else np.zeros((0, 2), np.uint64)
    rows_in = len(digests)
    report: dict[str, Any] = {"rows_in": rows_in, "threshold": section["threshold"], "field": section["field"]}
    if section["exact"]:
        keep, first = dedupe_mod.first_occurrences(digests)
        removed = np.flatnonzero(~keep)
        sample = [(int(first[removed[i]]), int(removed[i])) for i in
                  dedupe_mod.exact_pair_picks(len(removed), min(10, section["sample_pairs"]))]
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
        report["exact_pairs_sample"] = [{"similarity": 1.0, "kept_id": texts[a][0], "kept_text": dedupe_mod._clip(texts[a][1]),
                                         "removed_id": texts[b][0], "removed_text": dedupe_mod._clip(texts[b][1])}
                                        for a, b in sample]
    report["near_removed"] = 0
    report["rows_out"] = int(keep.sum())
    report["rows_by_source"] = tally.result()
    return report, tokens_out


def select(in_path: str, section: dict[str, Any], out_path: str, report_path: str) -> Result:
    """Positions chosen from the n_tokens column alone, then the rows streamed through."""
    started = time.perf_counter()
    n_tokens = batches.read_columns(in_path, ["n_tokens"])["n_tokens"].to_numpy()
    kept_positions = select_mod.positions(n_tokens, section)
    report = select_mod.report(n_tokens, kept_positions, section)
    keep = np.zeros(len(n_tokens), dtype=bool)
    keep[kept_positions] = True
    tally = SourceTally()
    offset = 0
    with batches.ParquetSink(out_path, batches.schema(in_path)) as sink:
        for batch in batches.iter_batches(in_path):
            mask = keep[offset:offset + batch.num_rows]
            tally.add(batch, mask)
            sink.write(batches.take_mask(batch, mask))
            offset += batch.num_rows
    report["rows_by_source"] = tally.result()
    fileio.write_json(report_path, report)
    log.info("select (%s): %d -> %d rows", report["strategy"], report["rows_in"], report["rows_out"])
    return _result({"rows_in": report["rows_in"], "rows_out": report["rows_out"], "tokens": report["tokens_out"],
                    **_source_metrics(report["rows_by_source"]),
                    "load_seconds": 0.0, "work_seconds": time.perf_counter() - started},
                   report_path, summary=f"{report['strategy']}: {report['rows_in']} -> {report['rows_out']} rows")


def decontaminate(in_path: str, section: dict[str, Any], out_path: str, report_path: str, *, offline: bool,
                  embedder: Any = None) -> Result:
    """section: the resolved decontaminate, evaluate and format sections (format fixes the split)."""
    from tunesmith import evaluate
    from tunesmith.data import decontaminate as decon

    t0 = time.perf_counter()
    cfg = section["decontaminate"]
    emb = cfg["embedding"]
    if emb["enabled"] and embedder is None:
        embedder = dedupe_mod.load_embedder(emb["model"], offline=offline, device=emb["device"])
    t1 = time.perf_counter()
    frame = load.read_rows(in_path)
    files, skipped = evaluate.task_documents(section["evaluate"])
    tasks = {name: decon.read_documents(path, name) for name, path in files.items()}
    kept, report = decon.run(frame, tasks, cfg, section["format"], skipped=skipped, embedder=embedder)
    for name, path in files.items():
        report["tasks"][name]["file"] = str(path)
        report["tasks"][name]["sha256"] = fileio.sha256(path)
    report = {"rows_in": len(frame), "rows_out": len(kept), "rows_dropped": len(frame) - len(kept), **report,
              "rows_by_source": by_source(frame, kept), "settings": cfg}
    fileio.write_parquet(out_path, kept)
    fileio.write_json(report_path, report)
    for name, why in skipped.items():
        log.warning("decontaminate: task %s not checked: %s", name, why)
    counts = {name: t["rows_matched"] for name, t in report["tasks"].items()}
    counts["heldout"] = report["heldout"]["rows_matched"]
    metrics = {"rows_in": len(frame), "rows_out": len(kept), "rows_dropped": len(frame) - len(kept),
               "rows_flagged": report["rows_flagged"], **{f"matched_{k}": v for k, v in counts.items()},
               **_source_metrics(report["rows_by_source"]),
               "load_seconds": t1 - t0, "work_seconds": time.perf_counter() - t1}
    verb = "dropped" if cfg["action"] == "drop" else "flagged"
    return _result(metrics, report_path, summary=f"{len(frame)} -> {len(kept)} rows; rows matching each task "
                   f"({verb}): " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def format_rows(in_path: str, tokenizer_dir: str, section: dict[str, Any], train_path: str, eval_path: str,
                preview_path: str, template_path: str, report_path: str, *, tokenizer: Any = None,
                weights: dict[str, float] | None = None) -> Result:
    """weights: a mixture's source -> weight (dataset.sources), applied to the train rows after the split.
    Without weights the rows stream from the parquet to the JSONL files batch by batch; the
    held-out positions come from the few columns the split needs (formatting.held_positions)."""
    import json

    t0 = time.perf_counter()
    tok = tokenizer if tokenizer is not None else tokens.load_tokenizer(tokenizer_dir)
    t1 = time.perf_counter()
    if _all_raw_text(in_path):
        from tunesmith.errors import DataError

        raise DataError(f"{in_path}: rows are raw text (dataset.schema: text); format makes conversations "
                        f"and needs the instruction or messages schema")
    template = formatting.resolve_template(section, tok, tokenizer_dir)
    label = section["template"]
    end_token = formatting.check_end_of_turn(tok, template, label, tokenizer_dir)
    has_source = "source" in batches.columns(in_path)
    per_source: dict[str, dict[str, int]] = {}
    counts = {"rows_in": 0, "rows_train": 0, "rows_eval": 0, "multi_turn_rows": 0}
    first_train: list[dict[str, Any]] = []

    def tally(item: dict[str, Any], held: bool) -> None:
        split = "eval" if held else "train"
        counts[f"rows_{split}"] += 1
        counts["multi_turn_rows"] += len(item["prompt"]) > 2
        if item.get("source") in per_source:
            per_source[item["source"]][split] += 1
        if not held and len(first_train) < section["preview_rows"]:
            first_train.append(item)

    def count_in(sources: Any, n: int) -> None:
        counts["rows_in"] += n
        for name in sources if has_source else ():
            per_source.setdefault(name, {"in": 0, "train": 0, "eval": 0})["in"] += 1

    mixture = None
    if weights:  # resampling draws from every train row of each source: held in memory
        frame = load.read_rows(in_path)
        count_in(frame["source"] if has_source else None, len(frame))
        train, evals = formatting.build(frame, section)
        before = len(train)
        train, mixture = formatting.mix(train, weights, section["seed"])
        log.info("format: %d train rows resampled to the mixture's weights: requested %s, obtained %s (from %d rows)",
                 len(train), mixture["requested"], mixture["obtained"], before)
        for item in train:
            tally(item, False)
        for item in evals:
            tally(item, True)
        fileio.write_jsonl(train_path, train)
        fileio.write_jsonl(eval_path, evals)
    else:
        held = formatting.held_positions(batches.read_columns(in_path, ["id", "split", "source"]), section)
        offset = 0
        with fileio.atomic_path(train_path) as train_tmp, fileio.atomic_path(eval_path) as eval_tmp, \
                open(train_tmp, "w", encoding="utf-8") as train_fh, open(eval_tmp, "w", encoding="utf-8") as eval_fh:
            for batch in batches.iter_batches(in_path):
                count_in(batch.column("source").to_pylist() if has_source else None, batch.num_rows)
                for item, is_held in formatting.items(batch.to_pylist(), section, held, offset):
                    (eval_fh if is_held else train_fh).write(json.dumps(item, ensure_ascii=False) + "\n")
                    tally(item, is_held)
                offset += batch.num_rows
    n_train, n_eval = counts["rows_train"], counts["rows_eval"]
    fileio.write_text(template_path, template)
    header = (f"# template: {label}; end of assistant turn: {end_token!r}; {n_train} train rows, "
              f"{n_eval} eval rows\n# Each example is the exact text the model sees; the loss falls on the "
              f"part between {formatting.COMPLETION_START} and {formatting.COMPLETION_END} (markers not part of "
              f"the text).\n\n")
    fileio.write_text(preview_path, header + formatting.preview(tok, template, first_train, section["preview_rows"]))
    log.info("format: %d train, %d eval rows with template %s", n_train, n_eval, label)
    report = {"rows_in": counts["rows_in"], "rows_out": n_train + n_eval, "rows_train": n_train,
              "rows_eval": n_eval, "multi_turn_rows": counts["multi_turn_rows"],
              "template": label, "end_of_turn": end_token}
    if has_source:
        report["rows_by_source"] = {str(name): c for name, c in per_source.items()}
        report["shares"] = mixture or {"requested": None, "obtained": {
            k: round(v["train"] / max(1, n_train), 4) for k, v in report["rows_by_source"].items()}}
    fileio.write_json(report_path, report)
    per_source_metrics = {f"rows_{split}.{name}": c[split] for name, c in (report.get("rows_by_source") or {}).items()
                          for split in ("train", "eval")}
    shares = {f"share.{name}": v for name, v in ((report.get("shares") or {}).get("obtained") or {}).items()}
    return _result({k: v for k, v in report.items() if isinstance(v, int)} | per_source_metrics | shares |
                   {"load_seconds": t1 - t0, "work_seconds": time.perf_counter() - t1},
                   report_path, preview_path, template_path,
                   summary=f"{n_train} train, {n_eval} eval rows with template {label}")


def _all_raw_text(path: str) -> bool:
    """Every row a raw-text document (text set, no instruction), read a batch of two columns at a time."""
    any_rows = False
    for batch in batches.iter_batches(path, ["text", "instruction"]):
        frame = batch.to_pandas()
        any_rows = any_rows or len(frame) > 0
        if not (frame["text"].astype(bool) & (frame["instruction"] == "")).all():
            return False
    return any_rows
