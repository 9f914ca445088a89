"""quantize: F16 + quantized GGUFs with llama.cpp's own tools, each loaded back and checked."""
from tunesmith.stage import run


def main(io):
    from tunesmith import quantize

    return quantize.stage(io.input["model"], io.output["gguf"], io.section, eval_jsonl=io.one("eval"),
                          threads=io.threads, log_file=io.log, name=io.recipe or "model")


if __name__ == "__main__":
    run(main)
