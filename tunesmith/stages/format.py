"""format: Render rows through the chat template into train.jsonl / eval.jsonl (split per source before any up-sampling), with a preview."""

from __future__ import annotations

import logging
import time
from typing import Any

from tunesmith import fileio
from tunesmith.data import batches, formatting, load, tokens
from tunesmith.data.accounting import stage_result
from tunesmith.errors import DataError
from tunesmith.result import Result
from tunesmith.stageio import StageIO

log = logging.getLogger("tunesmith.data")


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
    return stage_result({k: v for k, v in report.items() if isinstance(v, int)} | per_source_metrics | shares |
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


def run(io: StageIO) -> Result:
    return format_rows(io.input["selected"], io.input["tokenizer"], io.section["format"], io.output["train"],
                       io.output["eval"], io.output["preview"], io.output["template"], io.output["report"],
                       weights=load.mixture_weights(io.section["dataset"]))
