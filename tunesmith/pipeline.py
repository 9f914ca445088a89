"""The one ordered list of stages. Everything that iterates over stages reads it: the comparison,
the model card's row accounting, the runner and the tests (which also check that every rule of the
workflow is listed here and has its module tunesmith/stages/<rule>.py).

A new stage is: its module tunesmith/stages/<rule>.py (run(io) -> Result), its rule (script:
scripts/stage.py, code=stage_code("<rule>")), and one line here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stage:
    name: str                  # the Snakemake rule name, also the MLflow child run name
    group: str                 # data | data_shard | pairs | model | train | evaluate | export | compare
    rows_report: str | None = None  # data stages: results/<recipe>/data/<file> that holds the rows kept
    per_variant: bool = False  # one run per sweep variant (else one per recipe)
    # Inputs that are data the stage learns from or is scored on: (input name, MLflow context).
    # The runner logs each as an MLflow dataset input, which fills the UI's Dataset column.
    datasets: tuple[tuple[str, str], ...] = ()
    model_output: str | None = None  # the output that is a model folder: an MLflow logged model


STAGES: tuple[Stage, ...] = (
    Stage("prepare_model", "model"),
    Stage("download", "data", rows_report="source.json"),
    # The *_shard stages run only with dataset.shards > 1, one job per shard, each gathered by the
    # stage after it; not "data" stages, which every recipe runs.
    Stage("tokenize_shard", "data_shard"),
    Stage("tokenize_count", "data"),
    Stage("filter_shard", "data_shard"),
    Stage("filter", "data", rows_report="filter_report.json"),
    Stage("embed_shard", "data_shard"),
    Stage("minhash_shard", "data_shard"),
    Stage("minhash_buckets", "data_shard"),
    Stage("minhash_cluster", "data_shard"),
    Stage("dedupe", "data", rows_report="dedupe_report.json"),
    Stage("select", "data", rows_report="select_report.json"),
    Stage("decontaminate", "data", rows_report="decontaminate_report.json"),
    Stage("format", "data", rows_report="format_report.json"),
    Stage("build_pairs", "pairs"),
    Stage("curate_pairs", "pairs"),
    Stage("train_tokenizer", "train"),
    Stage("pretrain", "train"),
    Stage("train", "train", per_variant=True, datasets=(("train", "training"), ("eval", "evaluation"))),
    Stage("merge", "train", per_variant=True, model_output="merged"),
    Stage("evaluate_base", "evaluate", datasets=(("eval", "evaluation"),)),
    Stage("quantize", "export", per_variant=True),
    Stage("evaluate", "evaluate", per_variant=True, datasets=(("eval", "evaluation"),)),
    Stage("cards", "export", per_variant=True),
    Stage("publish", "export", per_variant=True),
    Stage("compare", "compare"),
)

BY_NAME = {s.name: s for s in STAGES}
STAGE_ORDER = tuple(s.name for s in STAGES)
DATA_STAGES = tuple(s.name for s in STAGES if s.group == "data")


def stage(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no stage named {name!r} (known: {', '.join(STAGE_ORDER)})") from None


def rows_reports(data_dir: str) -> list[str]:
    """The data stages' row-count files in stage order (declared inputs of merge, read for the card)."""
    return [f"{data_dir}/{s.rows_report}" for s in STAGES if s.rows_report]


# Plumbing that moves a stage's files and figures but does not change what the stage computes:
# editing it reruns nothing.
PLUMBING = frozenset({"tunesmith", "tunesmith.runner", "tunesmith.stageio", "tunesmith.tracking", "tunesmith.result",
                      "tunesmith.tracking_record", "tunesmith.tracking_run", "tunesmith.tracking_writer", "tunesmith.mlflow_store",
                      "tunesmith.fileio", "tunesmith.provenance",
                      "tunesmith.settings", "tunesmith.errors", "tunesmith.pipeline", "tunesmith.gpus"})


def _imports(path: Path) -> frozenset[str]:
    """tunesmith modules a source file imports, at any depth of its code (lazy imports included)."""
    return _parsed_imports(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=None)  # the Snakefile asks for every rule: parse each file once
def _parsed_imports(path: Path, mtime_ns: int) -> frozenset[str]:
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "tunesmith")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "tunesmith":
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from tunesmith import x`
    return frozenset(found)


def code_files(name: str, root: str | Path | None = None) -> list[Path]:
    """The library source files a stage runs: its module tunesmith/stages/<name>.py and everything it
    imports from tunesmith, followed through the library, less the plumbing."""
    root = Path(root) if root else Path(__file__).resolve().parents[1]

    def source(module: str) -> Path | None:
        base = root.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None  # a name imported from a module, not a module

    seen: set[str] = set()
    stage(name)  # an unknown name fails here
    todo = [f"tunesmith.stages.{name}"]
    while todo:
        module = todo.pop()
        if module in seen or module in PLUMBING or source(module) is None:
            continue
        seen.add(module)
        todo.extend(_imports(source(module)))
        if module == "tunesmith.objectives":  # its entries are imported by name at run time
            todo.extend(f"tunesmith.objectives.{p.stem}" for p in (root / "tunesmith/objectives").glob("*.py")
                        if p.stem != "__init__")
    return sorted({source(m) for m in seen})


def code_digest(name: str, root: str | Path | None = None) -> str:
    """sha256 over the stage's library sources: a rule param, so editing them reruns the stage."""
    import hashlib

    root = Path(root) if root else Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in code_files(name, root):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
