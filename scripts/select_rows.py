"""select: all rows, the top-k longest, or a seeded random k."""
from tunesmith.data import stages
from tunesmith.stage import run


def main(io):
    return stages.select(io.input["deduped"], io.section["select"], io.output["selected"], io.output["report"])


if __name__ == "__main__":
    run(main)
