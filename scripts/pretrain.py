"""pretrain: causal-LM training on the corpus, from scratch (a Llama from the recipe's config) or continued (model.base)."""
from tunesmith.stage import run


def main(io):
    from tunesmith.pretraining import pretrain

    return pretrain(tokenizer_dir=io.one("tokenizer"), base=io.one("base"), section=io.section, model_out=io.output["model"],
                    metrics_path=io.output["metrics"], loss_path=io.output["loss"])


if __name__ == "__main__":
    run(main)
