"""What a stage is handed: its rule's named inputs, outputs, params, log, threads and wildcards
(StageIO), and the command-line form of the same (from_argv / to_argv), used when a stage is run
by hand and when the train stage relaunches itself under accelerate. The one owner of that protocol."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError


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



def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in values or []:
        if "=" not in item:
            raise SystemExit(f"{flag} takes name=path, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = value
    return out



def from_argv(stages: tuple[str, ...], argv: list[str] | None = None) -> StageIO:
    """A stage run by hand: `python scripts/stage.py <rule> --recipe ... --input name=path ...`."""
    parser = argparse.ArgumentParser(description="Run one tunesmith stage by hand, as its rule would.")
    parser.add_argument("stage", choices=stages, metavar="STAGE", help=f"the rule to run: {', '.join(stages)}")
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


def to_argv(io: StageIO, params_file: str | Path) -> list[str]:
    """The command line from_argv reads back as this io (its params in params_file, its log and threads
    left to the caller): how a job hands itself to processes that cannot see Snakemake's object."""
    argv = [io.stage, "--params", str(params_file), "--recipe", io.recipe]
    if io.variant:
        argv += ["--variant", io.variant]
    for name, value in io.wildcards.items():
        if name not in ("recipe", "variant"):
            argv += ["--wildcard", f"{name}={value}"]
    for flag, files in (("--input", io.input), ("--output", io.output)):
        for k, v in files.items():
            argv += [flag, f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"]
    return argv
