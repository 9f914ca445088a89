"""evaluate: lm-eval on the tuned model and each GGUF, compared with the base (and the upstream
recipe's model in a chain): base -> tuned -> Q8_0 -> Q4_K_M, with contamination counts beside each score."""

from __future__ import annotations

from tunesmith import evaluation
from tunesmith.result import Result
from tunesmith.stageio import StageIO


def run(io: StageIO) -> Result:
    return evaluation.stage(io.stage, io.input["tuned"], io.output, io.section, eval_jsonl=io.one("eval"),
                            template=io.one("template"), gguf_dir=io.one("gguf"), base_scores=io.one("base_scores"),
                            recipe=io.recipe, variant=io.variant, threads=io.threads, upstream=io.one("upstream"),
                            contamination=io.one("contamination"))
