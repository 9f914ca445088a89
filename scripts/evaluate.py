"""Entry for the evaluate rule (stub: to be implemented)."""
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    raise NotImplementedError("evaluate")


if __name__ == "__main__":
    run(main, "evaluate")
