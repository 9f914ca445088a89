"""evaluate_base: lm-eval on the base model (the scores every variant of the recipe compares against)."""

from __future__ import annotations

from tunesmith.result import Result
from tunesmith.stageio import StageIO
from tunesmith.stages.evaluate import evaluate_model


def run(io: StageIO) -> Result:
    return evaluate_model(io.stage, io.input["base"], io.output, io.section, eval_jsonl=io.one("eval"),
                          template=io.one("template"), recipe=io.recipe, variant=io.variant, threads=io.threads)
