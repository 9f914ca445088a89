"""Entry for the tokenize_count rule (stub: to be implemented)."""
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    raise NotImplementedError("tokenize_count")


if __name__ == "__main__":
    run(main, "tokenize_count")
