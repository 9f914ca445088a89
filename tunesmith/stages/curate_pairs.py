"""curate_pairs: read preference pairs (a local file or a hub dataset), check and clean them, and
count every drop."""

from __future__ import annotations

from tunesmith.data import pairs
from tunesmith.result import Result
from tunesmith.stageio import StageIO


def run(io: StageIO) -> Result:
    # preference.source as written when it is a hub id (only a local file is an input of the rule)
    source = io.one("pairs") or io.section["preference"]["source"]
    return pairs.curate_stage(source, io.input["tokenizer"], io.input["template"], io.section, io.output["pairs"],
                              io.output["report"], io.output["hist"])
