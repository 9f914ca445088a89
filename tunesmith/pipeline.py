"""The one ordered list of stages. Everything that iterates over stages reads it: the comparison,
the model card's row accounting, the by-hand runner and the tests (which also check that every
rule of the workflow is listed here and every entry has its rule and script).

A new stage is: its library function, its entry script, its rule, and one line here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str                  # the Snakemake rule name, also the MLflow child run name
    group: str                 # data | model | train | evaluate | export | compare
    script: str                # scripts/<script>: the rule's entry
    rows_report: str | None = None  # data stages: results/<recipe>/data/<file> that holds the rows kept
    per_variant: bool = False  # one run per sweep variant (else one per recipe)


STAGES: tuple[Stage, ...] = (
    Stage("prepare_model", "model", "prepare_model.py"),
    Stage("download", "data", "download.py", rows_report="source.json"),
    Stage("tokenize_count", "data", "tokenize_count.py"),
    Stage("filter", "data", "filter.py", rows_report="filter_report.json"),
    Stage("dedupe", "data", "dedupe.py", rows_report="dedupe_report.json"),
    Stage("select", "data", "select_rows.py", rows_report="select_report.json"),
    Stage("format", "data", "format.py", rows_report="format_report.json"),
    Stage("train_tokenizer", "train", "train_tokenizer.py"),
    Stage("pretrain", "train", "pretrain.py"),
    Stage("train", "train", "train.py", per_variant=True),
    Stage("merge", "train", "merge.py", per_variant=True),
    Stage("evaluate_base", "evaluate", "evaluate.py"),
    Stage("quantize", "export", "quantize.py", per_variant=True),
    Stage("evaluate", "evaluate", "evaluate.py", per_variant=True),
    Stage("compare", "compare", "compare.py"),
)

BY_NAME = {s.name: s for s in STAGES}
STAGE_ORDER = tuple(s.name for s in STAGES)
DATA_STAGES = tuple(s.name for s in STAGES if s.group == "data")


def stage(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no stage named {name!r} (known: {', '.join(STAGE_ORDER)})") from None


def for_script(script: str) -> Stage:
    """The stage an entry script runs when started by hand (evaluate.py serves two: the tuned one)."""
    found = [s for s in STAGES if s.script == script]
    if not found:
        raise KeyError(f"no stage runs scripts/{script}")
    return found[-1]


def rows_reports(data_dir: str) -> list[str]:
    """The data stages' row-count files in stage order (declared inputs of merge, read for the card)."""
    return [f"{data_dir}/{s.rows_report}" for s in STAGES if s.rows_report]
