"""The one ordered list of stages. Everything that iterates over stages reads it: the comparison,
the model card's row accounting, the by-hand runner and the tests (which also check that every
rule of the workflow is listed here and every entry has its rule and script).

A new stage is: its library function, its entry script, its rule, and one line here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stage:
    name: str                  # the Snakemake rule name, also the MLflow child run name
    group: str                 # data | data_shard | pairs | model | train | evaluate | export | compare
    script: str                # scripts/<script>: the rule's entry
    rows_report: str | None = None  # data stages: results/<recipe>/data/<file> that holds the rows kept
    per_variant: bool = False  # one run per sweep variant (else one per recipe)
    # Inputs that are data the stage learns from or is scored on: (input name, MLflow context).
    # The runner logs each as an MLflow dataset input, which fills the UI's Dataset column.
    datasets: tuple[tuple[str, str], ...] = ()
    model_output: str | None = None  # the output that is a model folder: an MLflow logged model


STAGES: tuple[Stage, ...] = (
    Stage("prepare_model", "model", "prepare_model.py"),
    Stage("download", "data", "download.py", rows_report="source.json"),
    # The *_shard stages run only with dataset.shards > 1, one job per shard, each gathered by the
    # stage after it; not "data" stages, which every recipe runs.
    Stage("tokenize_shard", "data_shard", "tokenize_shard.py"),
    Stage("tokenize_count", "data", "tokenize_count.py"),
    Stage("filter_shard", "data_shard", "filter_shard.py"),
    Stage("filter", "data", "filter.py", rows_report="filter_report.json"),
    Stage("embed_shard", "data_shard", "embed_shard.py"),
    Stage("minhash_shard", "data_shard", "minhash_shard.py"),
    Stage("minhash_buckets", "data_shard", "minhash_buckets.py"),
    Stage("minhash_cluster", "data_shard", "minhash_cluster.py"),
    Stage("dedupe", "data", "dedupe.py", rows_report="dedupe_report.json"),
    Stage("select", "data", "select_rows.py", rows_report="select_report.json"),
    Stage("decontaminate", "data", "decontaminate.py", rows_report="decontaminate_report.json"),
    Stage("format", "data", "format.py", rows_report="format_report.json"),
    Stage("build_pairs", "pairs", "build_pairs.py"),
    Stage("curate_pairs", "pairs", "curate_pairs.py"),
    Stage("train_tokenizer", "train", "train_tokenizer.py"),
    Stage("pretrain", "train", "pretrain.py"),
    Stage("train", "train", "train.py", per_variant=True, datasets=(("train", "training"), ("eval", "evaluation"))),
    Stage("merge", "train", "merge.py", per_variant=True, model_output="merged"),
    Stage("evaluate_base", "evaluate", "evaluate.py", datasets=(("eval", "evaluation"),)),
    Stage("quantize", "export", "quantize.py", per_variant=True),
    Stage("evaluate", "evaluate", "evaluate.py", per_variant=True, datasets=(("eval", "evaluation"),)),
    Stage("cards", "export", "cards.py", per_variant=True),
    Stage("publish", "export", "publish.py", per_variant=True),
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


# Plumbing that moves a stage's files and figures but does not change what the stage computes:
# editing it reruns nothing.
PLUMBING = frozenset({"tunesmith", "tunesmith.stage", "tunesmith.tracking", "tunesmith.result", "tunesmith.fileio",
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
    """The library source files a stage runs: everything its entry script imports from tunesmith,
    followed through the library, less the plumbing."""
    root = Path(root) if root else Path(__file__).resolve().parents[1]

    def source(module: str) -> Path | None:
        base = root.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None  # a name imported from a module, not a module

    seen: set[str] = set()
    todo = list(_imports(root / "scripts" / stage(name).script))
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
