"""Plumbing shared by the entry scripts in scripts/: one object with named inputs, outputs,
params and the log path, filled from Snakemake's `snakemake` object or from argparse, so every
rule's script also runs by hand:

    python scripts/filter.py --input raw=results/x/data/raw.parquet --output filtered=... \
        --params params.json --log logs/x/filter.log
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
    input: dict[str, str]
    output: dict[str, str]
    params: dict[str, Any]
    log: str | None = None
    threads: int = 1
    wildcards: dict[str, str] = field(default_factory=dict)


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
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--input", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--output", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--params", help="JSON file with the rule's params (recipe section etc.)")
    parser.add_argument("--log", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    params = json.loads(Path(args.params).read_text()) if args.params else {}
    return StageIO(_pairs(args.input, "--input"), _pairs(args.output, "--output"), params, args.log, args.threads)


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


def run(main: Callable[[StageIO], None], description: str) -> None:
    """Run a stage from a Snakemake script: directive or from the command line."""
    smk = sys.modules["__main__"].__dict__.get("snakemake")
    io = from_snakemake(smk) if smk is not None else from_argv(description)
    with _logging_to(io.log):
        try:
            main(io)
        except TunesmithError as exc:
            log.error("%s", exc)
            print(f"ERROR: {exc}", file=sys.stderr)
            sys.exit(1)
        except Exception:
            traceback.print_exc()
            raise
