"""Entry for the train rule: SFT (full | lora | qlora | unsloth) with trl, resumable.

By hand:  python scripts/train.py --input train=... --input eval=... --input template=... \
              --input base=resources/models/smollm2-135m-instruct --output model=.../model/trained \
              --output metrics=.../train/metrics.json --output loss=.../train/loss.png --params params.json
"""
from pathlib import Path

from tunesmith import settings, tracking, trainkit
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    section = io.params["section"]
    train_cfg = section["train"]
    trainkit.require_device(train_cfg["method"])  # fail fast, before MLflow or model loading
    gpus = int(train_cfg.get("gpus") or 1)
    if gpus > 1 and trainkit.cuda_available() and not trainkit.under_launcher():
        trainkit.relaunch_multi_gpu(Path(__file__).resolve().parents[1] / "scripts" / "train.py", gpus, io)
        return
    from tunesmith.training import SFTPaths, train_sft

    paths = SFTPaths(train=io.input["train"], eval=io.input.get("eval", ""), template=io.input.get("template", ""),
                     base=io.input["base"], model=io.output["model"], metrics=io.output["metrics"],
                     loss=io.output["loss"])
    if trainkit.world_rank() != 0:
        train_sft(paths, section)
        return
    with tracking.stage_run("train", io.params, io.input, io.output, recipe=io.params["recipe"],
                            variant=io.params.get("variant"), results_dir=settings.results_dir(),
                            section=section) as rec:
        m = train_sft(paths, section, rec)
    print(f"trained {m['method']} on {m['device']}: loss {m['train_loss_first']} -> {m['train_loss_last']}, "
          f"eval {m['eval_loss_initial']} -> {m['eval_loss']}, {m['steps']} steps, {m['train_seconds']:.0f} s")


if __name__ == "__main__":
    run(main, "train")
