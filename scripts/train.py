"""train: an objective (sft | dpo | kto | grpo) on a method (full | lora | qlora | unsloth) with trl, resumable.

By hand:  python scripts/train.py --recipe demo --input train=... --input eval=... --input template=... \
              --input base=resources/models/smollm2-135m-instruct --output model=.../model/trained \
              --output metrics=.../train/metrics.json --output loss=.../train/loss.png --params params.json
"""
from pathlib import Path

from tunesmith import trainkit
from tunesmith.stage import run


def main(io):
    train_cfg = io.section["train"]
    trainkit.die_with_launcher()
    cuda = trainkit.require_device(train_cfg["method"])  # fail fast, before model loading
    trainkit.check_fsdp(train_cfg, cuda)
    if trainkit.needs_relaunch(train_cfg):
        return trainkit.relaunch(Path(__file__).resolve(), train_cfg, io)
    from tunesmith import training

    objective = train_cfg["objective"]
    if objective == "sft":
        return training.train_sft(training.SFTPaths(
            train=io.input["train"], eval=io.one("eval") or "", template=io.one("template") or "",
            base=io.input["base"], model=io.output["model"], metrics=io.output["metrics"], loss=io.output["loss"]),
            io.section)
    # The objective's step histories (rewards, margins, accuracies) plot beside the loss curve.
    paths = training.ObjectivePaths(
        train=io.input["train"], eval=io.one("eval") or "", template=io.one("template") or "", base=io.input["base"],
        model=io.output["model"], metrics=io.output["metrics"], loss=io.output["loss"],
        plot=str(Path(io.output["metrics"]).with_name("rewards.png")))
    if objective == "grpo":
        return training.train_grpo(paths, io.section)
    return training.train_preference(paths, io.section)


if __name__ == "__main__":
    run(main)
