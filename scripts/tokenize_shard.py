"""tokenize_shard: token counts of one of dataset.shards slices of raw.parquet (tokenize_count gathers them)."""
from tunesmith.data import stages
from tunesmith.stage import run


def main(io):
    shard, shards = io.shard_of()
    return stages.tokenize_shard(io.input["raw"], io.input["tokenizer"], io.section["tokenize"], shard, shards,
                                 io.output["counts"])


if __name__ == "__main__":
    run(main)
