"""Entry for the merge rule (stub: to be implemented)."""
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    raise NotImplementedError("merge")


if __name__ == "__main__":
    run(main, "merge")
