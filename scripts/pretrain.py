"""pretrain: a Llama from the recipe's config, trained from scratch on the corpus."""
from tunesmith.stage import run


def main(io):
    from tunesmith.pretraining import pretrain

    return pretrain(tokenizer_dir=io.input["tokenizer"], section=io.section, model_out=io.output["model"],
                    metrics_path=io.output["metrics"], loss_path=io.output["loss"])


if __name__ == "__main__":
    run(main)
