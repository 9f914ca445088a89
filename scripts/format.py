"""format: prompt/completion conversations, held-out split, preview, template, row report."""
from tunesmith.data import load, stages
from tunesmith.stage import run


def main(io):
    return stages.format_rows(io.input["selected"], io.input["tokenizer"], io.section["format"], io.output["train"],
                              io.output["eval"], io.output["preview"], io.output["template"], io.output["report"],
                              weights=load.mixture_weights(io.section["dataset"]))


if __name__ == "__main__":
    run(main)
