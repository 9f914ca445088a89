"""Entry for the pretrain rule: a Llama from the recipe's config, trained from scratch on the corpus."""
from tunesmith import settings, tracking, trainkit
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    from tunesmith.pretraining import pretrain

    kwargs = dict(tokenizer_dir=io.input["tokenizer"], section=io.params["section"], model_out=io.output["model"],
                  metrics_path=io.output["metrics"], loss_path=io.output["loss"])
    if trainkit.world_rank() != 0:
        pretrain(**kwargs)
        return
    with tracking.stage_run("pretrain", io.params, io.input, io.output, recipe=io.params["recipe"],
                            results_dir=settings.results_dir(), section=io.params["section"]) as rec:
        m = pretrain(**kwargs, record=rec)
    print(f"pretrained {m['total_params']} parameters: loss {m['train_loss_first']} -> {m['train_loss_last']}, "
          f"eval {m['eval_loss']}, {m['steps']} steps, {m['train_seconds']:.0f} s")


if __name__ == "__main__":
    run(main, "pretrain")
