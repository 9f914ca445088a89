"""filter: drop empty / too short / too long / regex rows, every drop counted."""
from tunesmith.data import stages
from tunesmith.stage import run


def main(io):
    return stages.filter_rows(io.input["raw"], io.input["counts"], io.section["filter"], io.output["filtered"],
                              io.output["report"])


if __name__ == "__main__":
    run(main)
