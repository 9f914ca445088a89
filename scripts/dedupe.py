"""Entry for the dedupe rule (stub: to be implemented)."""
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    raise NotImplementedError("dedupe")


if __name__ == "__main__":
    run(main, "dedupe")
