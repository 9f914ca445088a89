"""filter_shard: filter one of dataset.shards slices of raw.parquet and hash its kept rows (filter gathers them)."""
from tunesmith.data import stages
from tunesmith.stage import run


def main(io):
    shard, shards = io.shard_of()
    return stages.filter_shard(io.input["raw"], io.input["counts"], io.section["filter"], shard, shards,
                               io.output["filtered"], io.output["report"], io.output["digests"])


if __name__ == "__main__":
    run(main)
