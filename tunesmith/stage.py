"""The runner every entry script in scripts/ hands its stage to.

It builds one StageIO from Snakemake's `snakemake` object (or from argv when a script is run by
hand), takes the stage name from the rule and recipe/variant from the wildcards, sends output to
the rule's log, calls the stage, records its Result (file first, then MLflow) from rank 0 only,
and prints the stage's one-line summary, or its one-line cause on failure, on the terminal:

    python scripts/filter.py --recipe demo --input raw=results/demo/data/raw.parquet \
        --input counts=... --output filtered=... --output report=... --params params.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from tunesmith.errors import TunesmithError

log = logging.getLogger("tunesmith")


@dataclass
class StageIO:
    input: dict[str, Any]
    output: dict[str, str]
    params: dict[str, Any]
    log: str | None = None
    threads: int = 1
    wildcards: dict[str, str] = field(default_factory=dict)
    stage: str = ""

    @property
    def section(self) -> dict[str, Any]:
        """The recipe sections the rule hands over (params.section), resolved with defaults."""
        return self.params.get("section") or {}

    @property
    def recipe(self) -> str:
        return self.wildcards.get("recipe", "")

    @property
    def variant(self) -> str | None:
        return self.wildcards.get("variant")

    def many(self, name: str) -> list[str]:
        """A list input (by hand: one path, or several separated by commas)."""
        value = self.input.get(name) or []
        if isinstance(value, str):
            value = value.split(",")
        return [str(v) for v in value]

    def shard_of(self) -> tuple[int, int]:
        """(shard, shards) of a shard job, shard 0-based, from its {shard}-of-{shards} wildcards
        (by hand: --wildcard shard=2 --wildcard shards=4)."""
        try:
            shard, shards = int(self.wildcards["shard"]), int(self.wildcards["shards"])
        except (KeyError, ValueError):
            raise TunesmithError(f"{self.stage} is one shard of dataset.shards: it needs the wildcards shard and "
                                 f"shards (by hand: --wildcard shard=1 --wildcard shards=4), got {self.wildcards}") from None
        if not 1 <= shard <= shards:
            raise TunesmithError(f"{self.stage}: shard {shard} of {shards} is not one of 1..{shards}")
        return shard - 1, shards

    def one(self, name: str) -> str | None:
        """An optional input: absent, or an empty list (Snakemake's 'none'), is None."""
        value = self.input.get(name)
        if isinstance(value, (list, tuple)):
            return str(value[0]) if value else None
        return str(value) if value else None


def _first(value: Any) -> str:
    # In script: rules a named input may arrive as a list (Snakemake 9).
    if isinstance(value, (list, tuple)):
        return str(value[0]) if len(value) == 1 else [str(v) for v in value]  # type: ignore[return-value]
    return str(value)


def from_snakemake(smk: Any) -> StageIO:
    return StageIO(
        input={k: _first(v) for k, v in smk.input.items()},
        output={k: _first(v) for k, v in smk.output.items()},
        params={k: v for k, v in smk.params.items()},
        log=str(smk.log[0]) if len(smk.log) else None,
        threads=int(smk.threads),
        wildcards={k: str(v) for k, v in smk.wildcards.items()},
        stage=str(smk.rule),
    )


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in values or []:
        if "=" not in item:
            raise SystemExit(f"{flag} takes name=path, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = value
    return out


def from_argv(description: str, argv: list[str] | None = None) -> StageIO:
    from tunesmith import pipeline

    default_stage = pipeline.for_script(Path(sys.argv[0]).name).name
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--stage", default=default_stage, choices=pipeline.STAGE_ORDER,
                        help=f"the rule this run stands for (default: {default_stage})")
    parser.add_argument("--recipe", default="", help="recipe name, as the {recipe} wildcard (without it the "
                        "stage runs untracked)")
    parser.add_argument("--variant", default=None, help="sweep variant, as the {variant} wildcard")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--output", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--wildcard", action="append", default=[], metavar="NAME=VALUE",
                        help="another wildcard of the rule (a shard job: shard=2, shards=4)")
    parser.add_argument("--params", help="JSON file with the rule's params (recipe section etc.)")
    parser.add_argument("--log", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    params = json.loads(Path(args.params).read_text()) if args.params else {}
    wildcards = {**_pairs(args.wildcard, "--wildcard"), "recipe": args.recipe,
                 **({"variant": args.variant} if args.variant else {})}
    return StageIO(_pairs(args.input, "--input"), _pairs(args.output, "--output"), params, args.log, args.threads,
                   wildcards, args.stage)


@contextlib.contextmanager
def _logging_to(path: str | None) -> Iterator[None]:
    """Send logging, stdout and stderr to the rule's log file (and keep errors on the terminal)."""
    if not path:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    with open(path, "w", buffering=1) as fh:
        old_out, old_err = os.dup(1), os.dup(2)
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
        sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                            stream=sys.stderr, force=True)
        try:
            yield
        except BaseException:
            exc = sys.exc_info()[1]
            if isinstance(exc, TunesmithError):
                terminal.write(f"tunesmith error: {exc}\n(log: {path})\n")
            elif not isinstance(exc, SystemExit):
                terminal.write(f"tunesmith: unexpected failure, see {path}\n")
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(old_out, 1)
            os.dup2(old_err, 2)
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


def call_stage(stage_fn: Callable[[StageIO], Any], io: StageIO) -> Any:
    """Call the stage; rank 0 records its Result. Stages outside a recipe (prepare_model,
    compare) have no experiment to record under; other ranks of a multi-process run only compute."""
    from tunesmith import pipeline, settings, tracking, trainkit

    if trainkit.world_rank() != 0 or not io.recipe:
        return stage_fn(io)
    entry = pipeline.BY_NAME.get(io.stage)
    datasets = {io.one(name): context for name, context in (entry.datasets if entry else ()) if io.one(name)}
    model_dir = io.output.get(entry.model_output) if entry and entry.model_output else None
    # One record per shard job (tokenize_shard-2-of-4): the N jobs of a shard rule run at once and
    # must not write one record file.
    name = f"{io.stage}-{io.wildcards['shard']}-of-{io.wildcards.get('shards')}" if "shard" in io.wildcards else io.stage
    with tracking.stage_run(name, io.input, io.output, recipe=io.recipe, variant=io.variant,
                            results_dir=settings.results_dir(), section=io.section, datasets=datasets,
                            model_dir=model_dir) as record:
        result = stage_fn(io)
        if result is not None and result.delegated:
            record.discard = True
        elif result is not None:
            record.take(result)
    return result


def run(stage_fn: Callable[[StageIO], Any]) -> None:
    """Run a stage from a Snakemake script: directive or from the command line.

    A TunesmithError ends the process with exit 1 once its message is in the log and on the
    terminal; anything else keeps its traceback (a bug)."""
    from tunesmith import trainkit

    smk = sys.modules["__main__"].__dict__.get("snakemake")
    io = from_snakemake(smk) if smk is not None else from_argv((stage_fn.__doc__ or "").strip() or "tunesmith stage")
    try:
        with _logging_to(io.log):
            try:
                if smk is not None:  # before anything starts CUDA: which of the machine's GPUs
                    from tunesmith import gpus

                    gpus.claim_for_job(int(smk.resources.get("gpu", 0) or 0))
                result = call_stage(stage_fn, io)
            except TunesmithError as exc:
                log.error("%s", exc)
                raise
            except Exception:
                traceback.print_exc()
                raise
            summary = getattr(result, "summary", "") if trainkit.world_rank() == 0 else ""
            if summary:
                print(f"{io.stage}: {summary}")
        if summary and io.log:  # and once more on the terminal, where the user looks
            print(f"{io.stage}: {summary}")
    except TunesmithError:
        sys.exit(1)
