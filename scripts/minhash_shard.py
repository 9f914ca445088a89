"""minhash_shard: MinHash signatures of one of dataset.shards slices of the filtered rows."""
from tunesmith.data import minhash_stages
from tunesmith.stage import run


def main(io):
    shard, shards = io.shard_of()
    return minhash_stages.minhash_shard(io.input["filtered"], io.section["dedupe"], shard, shards,
                                        io.output["signatures"])


if __name__ == "__main__":
    run(main)
