"""train_tokenizer: ByteLevel BPE + special tokens + alternating-roles chat template."""
from tunesmith.stage import run


def main(io):
    from tunesmith.pretraining import train_tokenizer_stage

    return train_tokenizer_stage(io.section["pretrain"], io.output["tokenizer"])


if __name__ == "__main__":
    run(main)
