"""Entry for the train_tokenizer rule (stub: to be implemented)."""
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    raise NotImplementedError("train_tokenizer")


if __name__ == "__main__":
    run(main, "train_tokenizer")
