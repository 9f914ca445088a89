"""Entry for the pretrain rule (stub: to be implemented)."""
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    raise NotImplementedError("pretrain")


if __name__ == "__main__":
    run(main, "pretrain")
