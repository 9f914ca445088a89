"""The runner: what scripts/stage.py (every rule's script) hands over to.

It builds one StageIO from Snakemake's `snakemake` object (or from argv when a stage is run by
hand), takes the stage name from the rule and recipe/variant from the wildcards, sends output to
the rule's log, calls `tunesmith.stages.<rule>.run`, records its Result (file first, then MLflow)
from rank 0 only, and prints the stage's one-line summary, or its one-line cause on failure, on
the terminal:

    python scripts/stage.py filter --recipe demo --input raw=results/demo/data/raw.parquet \
        --input counts=... --output filtered=... --output report=... --params params.json
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

from tunesmith import gpus, pipeline, ranks, settings, tracking_run
from tunesmith.errors import TunesmithError
from tunesmith.stageio import StageIO, from_argv

log = logging.getLogger("tunesmith")


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
    if ranks.world_rank() != 0 or not io.recipe:
        return stage_fn(io)
    entry = pipeline.BY_NAME.get(io.stage)
    datasets = {io.one(name): context for name, context in (entry.datasets if entry else ()) if io.one(name)}
    model_dir = io.output.get(entry.model_output) if entry and entry.model_output else None
    # One record per shard job (tokenize_shard-2-of-4): the N jobs of a shard rule run at once and
    # must not write one record file.
    name = f"{io.stage}-{io.wildcards['shard']}-of-{io.wildcards.get('shards')}" if "shard" in io.wildcards else io.stage
    with tracking_run.stage_run(name, io.input, io.output, recipe=io.recipe, variant=io.variant,
                            results_dir=settings.results_dir(), section=io.section, datasets=datasets,
                            model_dir=model_dir) as record:
        result = stage_fn(io)
        if result is not None and result.delegated:
            record.discard = True
        elif result is not None:
            record.take(result)
    return result


def stage_function(name: str) -> Callable[[StageIO], Any]:
    """`tunesmith.stages.<name>.run`: the rule's name is the registry."""
    pipeline.stage(name)  # an unknown name fails here, listing the stages
    return importlib.import_module(f"tunesmith.stages.{name}").run


def main(argv: list[str] | None = None) -> None:
    """Run a stage from a Snakemake script: directive or from the command line.

    A TunesmithError ends the process with exit 1 once its message is in the log and on the
    terminal; anything else keeps its traceback (a bug)."""
    smk = sys.modules["__main__"].__dict__.get("snakemake")
    io = from_snakemake(smk) if smk is not None else from_argv(pipeline.STAGE_ORDER, argv)
    try:
        with _logging_to(io.log):
            try:
                if smk is not None:  # before anything starts CUDA: which of the machine's GPUs
                    gpus.claim_for_job(int(smk.resources.get("gpu", 0) or 0))
                result = call_stage(stage_function(io.stage), io)
            except TunesmithError as exc:
                log.error("%s", exc)
                raise
            except Exception:
                traceback.print_exc()
                raise
            summary = getattr(result, "summary", "") if ranks.world_rank() == 0 else ""
            if summary:
                print(f"{io.stage}: {summary}")
        if summary and io.log:  # and once more on the terminal, where the user looks
            print(f"{io.stage}: {summary}")
    except TunesmithError:
        sys.exit(1)


if __name__ == "__main__":  # how the train stage relaunches itself under accelerate (tunesmith.launch)
    main()
