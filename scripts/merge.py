"""merge: adapter + 16-bit base -> merged bf16 model, logit check, samples, card."""
from tunesmith.stage import run


def main(io):
    from tunesmith.merging import merge

    return merge(trained=io.input["model"], base=io.input["base"], template=io.input["template"],
                 merged=io.output["merged"], samples_path=io.output["samples"], check_path=io.output["check"],
                 section=io.section, eval_path=io.input["eval"], recipe=io.recipe, card=io.params["card"],
                 train_metrics_path=io.input["metrics"], reports=io.many("reports"), variant=io.variant or "main")


if __name__ == "__main__":
    run(main)
