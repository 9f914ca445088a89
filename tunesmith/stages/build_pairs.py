"""build_pairs: sample the upstream model on prompts with a verifiable reward and keep
chosen/rejected pairs where the verifier separates them."""

from __future__ import annotations

from tunesmith import verifier
from tunesmith.result import Result
from tunesmith.stageio import StageIO


def run(io: StageIO) -> Result:
    return verifier.build_stage(io.input["model"], io.input["prompts"], io.input["template"], io.section,
                                io.output["pairs"], io.output["report"])
