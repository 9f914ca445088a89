"""Entry for the select rule (stub: to be implemented)."""
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    raise NotImplementedError("select")


if __name__ == "__main__":
    run(main, "select")
