"""train_tokenizer: a ByteLevel BPE tokenizer with special tokens and a chat template, trained on
the pretraining corpus (kind: pretrain, from scratch)."""

from __future__ import annotations

from tunesmith import pretraining
from tunesmith.result import Result
from tunesmith.stageio import StageIO


def run(io: StageIO) -> Result:
    return pretraining.train_tokenizer_stage(io.section["pretrain"], io.output["tokenizer"])
