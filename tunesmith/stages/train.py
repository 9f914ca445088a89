"""train: an objective (sft | dpo | kto | grpo) on a method (full | lora | qlora | unsloth) with trl,
resumable; more than one process (GPUs, nodes, CPU processes, FSDP) relaunches under accelerate."""

from __future__ import annotations

from tunesmith import launch, methods, ranks, training
from tunesmith.result import Result
from tunesmith.stageio import StageIO


def run(io: StageIO) -> Result:
    train_cfg = io.section["train"]
    ranks.die_with_launcher()
    cuda = methods.require_device(train_cfg["method"])  # fail fast, before model loading
    launch.check_fsdp(train_cfg, cuda)
    if launch.needs_relaunch(train_cfg):
        return launch.relaunch(train_cfg, io)
    # The objective's inputs (objectives.<name>.INPUTS) are train and, for some, eval.
    paths = training.TrainPaths(train=io.input["train"], eval=io.one("eval") or "", template=io.one("template") or "",
                                base=io.input["base"], model=io.output["model"], metrics=io.output["metrics"],
                                loss=io.output["loss"])
    return training.train(paths, io.section)
