"""evaluate_base (writes `scores`) and evaluate (also writes `compare` and `plot`): lm-eval on the
base model, then on the tuned model and each GGUF: base -> tuned -> Q8_0 -> Q4_K_M."""
from tunesmith.stage import run


def main(io):
    from tunesmith import evaluate

    tuned = io.stage == "evaluate"
    return evaluate.stage(io.stage, io.input["tuned" if tuned else "base"], io.output, io.section,
                          eval_jsonl=io.one("eval"), template=io.one("template"), gguf_dir=io.one("gguf"),
                          base_scores=io.one("base_scores"), recipe=io.recipe, variant=io.variant, threads=io.threads,
                          upstream=io.one("upstream"), contamination=io.one("contamination"))


if __name__ == "__main__":
    run(main)
