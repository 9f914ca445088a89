"""embed_shard: embed one of dataset.shards slices of the rows near-dedupe compares."""
from tunesmith import settings
from tunesmith.data import stages
from tunesmith.stage import run


def main(io):
    shard, shards = io.shard_of()
    return stages.embed_shard(io.input["filtered"], io.section["dedupe"], shard, shards, io.output["embeddings"],
                              offline=settings.offline(), digests=io.many("digests"))


if __name__ == "__main__":
    run(main)
