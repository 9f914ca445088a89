"""build_pairs: the verifier's pairs, from the model's own samples scored against the references."""
from tunesmith.stage import run


def main(io):
    from tunesmith.verifier import build_stage

    return build_stage(io.input["model"], io.input["prompts"], io.input["template"], io.section, io.output["pairs"],
                       io.output["report"])


if __name__ == "__main__":
    run(main)
