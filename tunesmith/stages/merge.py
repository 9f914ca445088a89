"""merge: the adapter folded into the 16-bit base, logits checked against base + adapter, saved as
bf16 safetensors with samples and a model card."""

from __future__ import annotations

from tunesmith import merging
from tunesmith.result import Result
from tunesmith.stageio import StageIO


def run(io: StageIO) -> Result:
    return merging.merge(trained=io.input["model"], base=io.input["base"], template=io.input["template"],
                         merged=io.output["merged"], samples_path=io.output["samples"], check_path=io.output["check"],
                         section=io.section, eval_path=io.input["eval"], recipe=io.recipe, card=io.params["card"],
                         train_metrics_path=io.input["metrics"], reports=io.many("reports"),
                         variant=io.variant or "main")
