"""Entry for the format rule (stub: to be implemented)."""
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    raise NotImplementedError("format")


if __name__ == "__main__":
    run(main, "format")
