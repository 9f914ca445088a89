"""quantize: the merged model converted to GGUF (F16, then each requested type), each file checked
against the HF model's logits, with an Ollama Modelfile."""

from __future__ import annotations

from tunesmith import quantization
from tunesmith.result import Result
from tunesmith.stageio import StageIO


def run(io: StageIO) -> Result:
    return quantization.stage(io.input["model"], io.output["gguf"], io.section, eval_jsonl=io.one("eval"),
                              threads=io.threads, log_file=io.log, name=io.recipe or "model")
