"""prepare_model: bring a base model to resources/models/<slug> as safetensors (a hub snapshot, a
local folder, or a GGUF converted once)."""

from __future__ import annotations

from tunesmith import models, settings
from tunesmith.result import Result
from tunesmith.stageio import StageIO


def run(io: StageIO) -> Result:
    return models.prepare_stage(io.params["model"], io.output["model"], offline=settings.offline())
