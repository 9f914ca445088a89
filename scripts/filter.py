"""Entry for the filter rule (stub: to be implemented)."""
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    raise NotImplementedError("filter")


if __name__ == "__main__":
    run(main, "filter")
