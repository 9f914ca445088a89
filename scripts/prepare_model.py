"""Entry for the prepare_model rule (stub: to be implemented)."""
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    raise NotImplementedError("prepare_model")


if __name__ == "__main__":
    run(main, "prepare_model")
