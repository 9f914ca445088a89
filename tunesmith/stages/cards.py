"""cards: a model card per artifact (adapter, merged, GGUF) with scores, lineage and how to run it."""

from __future__ import annotations

from tunesmith import publishing
from tunesmith.result import Result
from tunesmith.stageio import StageIO


def run(io: StageIO) -> Result:
    return publishing.local_cards(recipe=io.recipe, variant=io.variant or "main",
                                  section=io.section.get("publish") or {}, folders=_folders(io),
                                  compare=io.one("compare"), dataset_source=io.params.get("dataset_source"),
                                  out_dir=io.output["cards"])


def _folders(io: StageIO) -> dict[str, str]:
    return {"adapter": io.input["adapter"], "merged": io.input["merged"], "gguf": io.one("gguf") or ""}
