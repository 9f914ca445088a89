"""The data stages as functions of paths: read inputs, do the work, write outputs atomically,
return a Result (tunesmith.result). scripts/<rule>.py hands each to the runner, which records it;
bench/ and tests call them directly.

Every Result's metrics hold ``load_seconds`` (tokenizer / model load), ``work_seconds`` (the
rest) and ``seconds`` (both), so start-up and work can be told apart.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tunesmith import fileio
from tunesmith.errors import DataError
from tunesmith.result import Result
from tunesmith.data import dedupe as dedupe_mod
from tunesmith.data import filters, formatting, load, plots, tokens
from tunesmith.data import select as select_mod

log = logging.getLogger("tunesmith.data")


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
    return Result(metrics=metrics, artifacts=[str(a) for a in artifacts], summary=summary)


def download(section: dict[str, Any], raw_path: str, source_path: str, *, offline: bool,
             cache_dir: str = "resources/downloads") -> Result:
    started = time.perf_counter()
    loaded = (load.load_mixture if section["sources"] else load.load)(section, offline=offline, cache_dir=cache_dir)
    fileio.write_parquet(raw_path, loaded.frame)
    info = dict(loaded.info)
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
                   stats_path: str, hist_path: str, *, tokenizer: Any = None, recipe: str = "") -> Result:
    t0 = time.perf_counter()
    tok = tokenizer if tokenizer is not None else tokens.load_counter(tokenizer_dir)
    t1 = time.perf_counter()
    frame = load.read_rows(raw_path)
    t2 = time.perf_counter()
    counts = tokens.count_frame(frame, tok, section["batch_size"], progress=len(frame) > 50_000)
    count_seconds = time.perf_counter() - t2
    stats = tokens.stats(counts)
    stats["tokenizer"] = str(tokenizer_dir)
    stats["count_seconds"] = round(count_seconds, 4)
    stats["rows_per_s"] = round(len(frame) / count_seconds, 1) if count_seconds else None
    stats["tokens_per_s"] = round(int(counts["n_tokens"].sum()) / count_seconds, 1) if count_seconds else None
    fileio.write_parquet(counts_path, counts)
    fileio.write_json(stats_path, stats)
    plots.token_histogram({"instruction + input": counts["n_instruction_tokens"].to_numpy(),
                           "output": counts["n_output_tokens"].to_numpy(),
                           "combined": counts["n_tokens"].to_numpy()}, hist_path,
                          title=f"{recipe} token counts ({Path(str(tokenizer_dir)).name} tokenizer)".strip())
    log.info("tokenize_count: %d rows, %d tokens in %.2f s", len(frame), stats["combined"]["sum"], count_seconds)
    return _result({"rows_in": len(frame), "rows_out": len(frame), "tokens": stats["combined"]["sum"],
                    "tokens_instruction": stats["instruction"]["sum"], "tokens_output": stats["output"]["sum"],
                    "tokens_p95": stats["combined"]["p95"], "tokens_max": stats["combined"]["max"],
                    "count_seconds": count_seconds, "rows_per_s": stats["rows_per_s"] or 0,
                    "tokens_per_s": stats["tokens_per_s"] or 0,
                    "load_seconds": t1 - t0, "work_seconds": time.perf_counter() - t1},
                   stats_path, hist_path, summary=f"{len(frame)} rows, {stats['combined']['sum']} tokens")


def filter_rows(raw_path: str, counts_path: str, section: dict[str, Any], out_path: str,
                report_path: str) -> Result:
    started = time.perf_counter()
    import pandas as pd

    frame = tokens.attach_counts(load.read_rows(raw_path), pd.read_parquet(counts_path))
    kept, report = filters.apply(frame, section)
    report["rows_by_source"] = by_source(frame, kept)
    fileio.write_parquet(out_path, kept)
    fileio.write_json(report_path, {**report, "settings": section})
    log.info("filter: %d -> %d rows; drops %s", report["rows_in"], report["rows_out"], report["drops"])
    return _result({"rows_in": report["rows_in"], "rows_out": report["rows_out"], "dropped": report["dropped"],
                    **{f"drop_{k.replace(':', '_')}": v for k, v in report["drops"].items()},
                    "tokens": report["tokens_out"], "load_seconds": 0.0, **_source_metrics(report["rows_by_source"]),
                    "work_seconds": time.perf_counter() - started},
                   report_path, summary=f"{report['rows_in']} -> {report['rows_out']} rows; drops {report['drops']}")


def embed_shard(in_path: str, section: dict[str, Any], shard: int, shards: int, out_path: str, *,
                offline: bool, model: Any = None) -> Result:
    """One of dataset.shards embedding jobs of near-dedupe (shard is 0-based); dedupe gathers them."""
    started = time.perf_counter()
    frame = load.read_rows(in_path)
    vectors, report = dedupe_mod.embed_shard(frame, section, shard, shards, offline=offline, model=model,
                                             progress=len(frame) > 2000 * shards)
    # the slice's place travels with it, so the gather can tell a stale or misplaced shard
    fileio.write_npz(out_path, vectors=vectors, start=report["start"], stop=report["stop"], total=report["rows_total"])
    log.info("embed_shard %d/%d: rows %d..%d of %d at %s rows/s", shard + 1, shards, report["start"], report["stop"],
             report["rows_total"], report["embed_rows_per_s"])
    load_seconds = report["model_load_seconds"]
    return _result({"rows": report["rows"], "rows_total": report["rows_total"], "shard": shard, "shards": shards,
                    "embed_seconds": report["embed_seconds"], "embed_rows_per_s": report["embed_rows_per_s"] or 0.0,
                    "load_seconds": load_seconds, "work_seconds": time.perf_counter() - started - load_seconds},
                   summary=f"shard {shard + 1}/{shards}: {report['rows']} rows embedded")


def gather_embeddings(paths: list[str]) -> Any:
    """The shard files (in shard order) as one array; a shard that does not continue the previous
    one, or was cut from another number of rows, names its file."""
    import numpy as np

    parts, stop, total = [], 0, None
    for shard, path in enumerate(paths):
        with np.load(path) as part:
            start, end, rows = int(part["start"]), int(part["stop"]), int(part["total"])
            vectors = part["vectors"]
        total = rows if total is None else total
        if start != stop or rows != total or len(vectors) != end - start:
            raise DataError(f"{path}: shard {shard + 1} of {len(paths)} holds rows {start}..{end} of {rows} "
                            f"({len(vectors)} vectors), expected rows from {stop} of {total}: re-run its embed_shard job")
        parts.append(vectors)
        stop = end
    if total is not None and stop != total:
        raise DataError(f"{paths[-1]}: the shards end at row {stop} of {total}")
    return np.concatenate(parts) if parts else None


def dedupe(in_path: str, section: dict[str, Any], out_path: str, report_path: str, hist_path: str, *,
           offline: bool, model: Any = None, recipe: str = "", embeddings: list[str] | None = None) -> Result:
    """embeddings: the embed_shard outputs in shard order (dataset.shards > 1); none: embed here."""
    started = time.perf_counter()
    frame = load.read_rows(in_path)
    vectors = gather_embeddings(embeddings) if embeddings else None
    kept, report, nn_sim = dedupe_mod.run(frame, section, offline=offline, model=model,
                                          progress=len(frame) > 2000, vectors=vectors)
    if embeddings:
        report["embedding_shards"] = len(embeddings)
    report["rows_by_source"] = by_source(frame, kept)
    fileio.write_parquet(out_path, kept)
    fileio.write_json(report_path, {**report, "settings": section})
    plots.similarity_histogram(nn_sim, report["threshold"] if section["near"] else None, hist_path,
                               title=f"{recipe} {report['field']} nearest-neighbour similarity".strip())
    load_seconds = report.get("model_load_seconds", 0.0)
    log.info("dedupe: %d -> %d rows (exact %d, near %d at %.2f)", report["rows_in"], report["rows_out"],
             report["exact_removed"], report["near_removed"], report["threshold"])
    return _result({"rows_in": report["rows_in"], "rows_out": report["rows_out"],
                    "exact_removed": report["exact_removed"], "near_removed": report["near_removed"],
                    "threshold": report["threshold"], "embed_seconds": report.get("embed_seconds", 0.0),
                    "embed_rows_per_s": report.get("embed_rows_per_s") or 0.0,
                    "search_seconds": report.get("search_seconds", 0.0), "tokens": int(kept["n_tokens"].sum()),
                    **_source_metrics(report["rows_by_source"]),
                    "load_seconds": load_seconds, "work_seconds": time.perf_counter() - started - load_seconds},
                   report_path, hist_path,
                   summary=f"{report['rows_in']} -> {report['rows_out']} rows (exact {report['exact_removed']}, "
                           f"near {report['near_removed']})")


def select(in_path: str, section: dict[str, Any], out_path: str, report_path: str) -> Result:
    started = time.perf_counter()
    frame = load.read_rows(in_path)
    kept, report = select_mod.apply(frame, section)
    report["rows_by_source"] = by_source(frame, kept)
    fileio.write_parquet(out_path, kept)
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
    """weights: a mixture's source -> weight (dataset.sources), applied to the train rows after the split."""
    t0 = time.perf_counter()
    tok = tokenizer if tokenizer is not None else tokens.load_tokenizer(tokenizer_dir)
    t1 = time.perf_counter()
    frame = load.read_rows(in_path)
    if (frame["text"].astype(bool) & (frame["instruction"] == "")).all() and len(frame):
        from tunesmith.errors import DataError

        raise DataError(f"{in_path}: rows are raw text (dataset.schema: text); format makes conversations "
                        f"and needs the instruction or messages schema")
    template = formatting.resolve_template(section, tok, tokenizer_dir)
    label = section["template"]
    end_token = formatting.check_end_of_turn(tok, template, label, tokenizer_dir)
    train, evals = formatting.build(frame, section)
    mixture = None
    if weights:
        before = len(train)
        train, mixture = formatting.mix(train, weights, section["seed"])
        log.info("format: %d train rows resampled to the mixture's weights: requested %s, obtained %s (from %d rows)",
                 len(train), mixture["requested"], mixture["obtained"], before)
    fileio.write_jsonl(train_path, train)
    fileio.write_jsonl(eval_path, evals)
    fileio.write_text(template_path, template)
    header = (f"# template: {label}; end of assistant turn: {end_token!r}; {len(train)} train rows, "
              f"{len(evals)} eval rows\n# Each example is the exact text the model sees; the loss falls on the "
              f"part between {formatting.COMPLETION_START} and {formatting.COMPLETION_END} (markers not part of "
              f"the text).\n\n")
    fileio.write_text(preview_path, header + formatting.preview(tok, template, train, section["preview_rows"]))
    log.info("format: %d train, %d eval rows with template %s", len(train), len(evals), label)
    report = {"rows_in": len(frame), "rows_out": len(train) + len(evals), "rows_train": len(train),
              "rows_eval": len(evals), "multi_turn_rows": int(sum(len(r["prompt"]) > 2 for r in train + evals)),
              "template": label, "end_of_turn": end_token}
    if "source" in frame.columns:
        report["rows_by_source"] = {str(name): {"in": int((frame["source"] == name).sum()),
                                                "train": sum(r.get("source") == name for r in train),
                                                "eval": sum(r.get("source") == name for r in evals)}
                                    for name in dict.fromkeys(frame["source"])}
        report["shares"] = mixture or {"requested": None, "obtained": {
            k: round(v["train"] / max(1, len(train)), 4) for k, v in report["rows_by_source"].items()}}
    fileio.write_json(report_path, report)
    per_source = {f"rows_{split}.{name}": c[split] for name, c in (report.get("rows_by_source") or {}).items()
                  for split in ("train", "eval")}
    shares = {f"share.{name}": v for name, v in ((report.get("shares") or {}).get("obtained") or {}).items()}
    return _result({k: v for k, v in report.items() if isinstance(v, int)} | per_source | shares |
                   {"load_seconds": t1 - t0, "work_seconds": time.perf_counter() - t1},
                   report_path, preview_path, template_path,
                   summary=f"{len(train)} train, {len(evals)} eval rows with template {label}")
