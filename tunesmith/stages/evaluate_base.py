"""evaluate_base: lm-eval on the base model (scores every variant of the recipe compares against)."""

from __future__ import annotations

from tunesmith import evaluation
from tunesmith.result import Result
from tunesmith.stageio import StageIO


def run(io: StageIO) -> Result:
    return evaluation.stage(io.stage, io.input["base"], io.output, io.section, eval_jsonl=io.one("eval"),
                            template=io.one("template"), gguf_dir=None, base_scores=None, recipe=io.recipe,
                            variant=io.variant, threads=io.threads, upstream=None, contamination=None)
