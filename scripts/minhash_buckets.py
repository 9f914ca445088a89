"""minhash_buckets: LSH buckets of one band group over every shard's signatures."""
from tunesmith.data import minhash_stages, stages
from tunesmith.stage import run


def main(io):
    group, groups = io.shard_of()  # {shard}-of-{shards} of this rule name its band group
    digests = io.many("digests")
    return minhash_stages.minhash_buckets(io.input["filtered"], io.many("signatures"), io.section["dedupe"], group,
                                          groups, io.output["pairs"],
                                          stages.gather_digests(digests, io.input["filtered"]) if digests else None)


if __name__ == "__main__":
    run(main)
