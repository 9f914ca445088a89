"""pretrain: causal-LM training on the corpus, of a Llama built from the recipe's config (from
scratch) or of model.base (continued)."""

from __future__ import annotations

from tunesmith import pretraining
from tunesmith.result import Result
from tunesmith.stageio import StageIO


def run(io: StageIO) -> Result:
    return pretraining.pretrain(tokenizer_dir=io.one("tokenizer"), base=io.one("base"), section=io.section,
                                model_out=io.output["model"], metrics_path=io.output["metrics"],
                                loss_path=io.output["loss"])
