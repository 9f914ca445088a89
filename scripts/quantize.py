"""Entry for the quantize rule (stub: to be implemented)."""
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    raise NotImplementedError("quantize")


if __name__ == "__main__":
    run(main, "quantize")
