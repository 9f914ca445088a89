"""publish (opt-in): push the adapter, merged model and GGUF files to Hub repositories with their
cards; the plan is written first, so a failed push leaves it to inspect."""

from __future__ import annotations

from pathlib import Path

from tunesmith import fileio, publishing, settings
from tunesmith.result import Result
from tunesmith.stageio import StageIO


def run(io: StageIO) -> Result:
    folders = {"adapter": io.input["adapter"], "merged": io.input["merged"], "gguf": io.one("gguf") or ""}
    plan_path = io.output["plan"]
    the_plan = publishing.plan(recipe=io.recipe, variant=io.variant or "main", section=io.section["publish"],
                               folders=folders, compare=io.one("compare"),
                               dataset_source=io.params.get("dataset_source"))
    fileio.write_json(Path(plan_path).with_suffix(".pending.json"), the_plan)  # inspectable when the push fails
    pushed = publishing.push(the_plan, offline=settings.offline())
    fileio.write_json(plan_path, {**the_plan, "pushed": pushed})
    return Result(metrics={"repos_pushed": len(pushed)},
                  tags={f"publish.{r['kind']}": r["repo_id"] for r in the_plan["repos"]},
                  artifacts=[plan_path], summary="pushed " + ", ".join(pushed))
