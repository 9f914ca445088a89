"""Entry for the train rule (stub: to be implemented)."""
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    raise NotImplementedError("train")


if __name__ == "__main__":
    run(main, "train")
