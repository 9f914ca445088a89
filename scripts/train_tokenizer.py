"""Entry for the train_tokenizer rule: ByteLevel BPE + special tokens + alternating-roles chat template."""
from tunesmith import settings, tracking
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    from tunesmith.pretraining import train_tokenizer

    pre = io.params["section"]["pretrain"]
    with tracking.stage_run("train_tokenizer", io.params, io.input, io.output, recipe=io.params["recipe"],
                            results_dir=settings.results_dir(), section=io.params["section"]) as rec:
        info = train_tokenizer(pre["corpus"], pre["tokenizer"], io.output["tokenizer"],
                               max_length=pre["model"]["max_position_embeddings"])
        rec.log_metrics(info)
    print(f"tokenizer: vocab {info['vocab_size']} from {info['documents']} documents, "
          f"{info['chars_per_token']:.2f} chars/token")


if __name__ == "__main__":
    run(main, "train_tokenizer")
