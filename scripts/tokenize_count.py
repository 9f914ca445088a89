"""tokenize_count: batched token counts, stats JSON and histogram (with dataset.shards > 1: the
tokenize_shard jobs' counts gathered)."""
from tunesmith.data import stages
from tunesmith.stage import run


def main(io):
    return stages.tokenize_count(io.input["raw"], io.input["tokenizer"], io.section["tokenize"], io.output["counts"],
                                 io.output["stats"], io.output["hist"], recipe=io.recipe, shards=io.many("shards"))


if __name__ == "__main__":
    run(main)
