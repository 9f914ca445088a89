"""evaluate_base (writes `scores`) and evaluate (also writes `compare` and `plot`): lm-eval on the
base model, then on the tuned model and each GGUF: base -> tuned -> Q8_0 -> Q4_K_M."""
from tunesmith.stage import run


def main(io):
    from tunesmith import evaluate

    return evaluate.stage(io.stage, io.input, io.output, io.section, recipe=io.recipe, variant=io.variant,
                          threads=io.threads)


if __name__ == "__main__":
    run(main)
