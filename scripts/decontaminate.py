"""decontaminate: curated rows against the eval tasks' documents, and train against held-out."""
from tunesmith import settings
from tunesmith.data import stages
from tunesmith.stage import run


def main(io):
    return stages.decontaminate(io.input["selected"], io.section, io.output["kept"], io.output["report"],
                                offline=settings.offline())


if __name__ == "__main__":
    run(main)
