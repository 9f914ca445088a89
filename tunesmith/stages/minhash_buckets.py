"""minhash_buckets: LSH buckets of one band group over every shard's signatures."""

from __future__ import annotations

from tunesmith.data import minhash_jobs
from tunesmith.data.duplicates import gather_digests
from tunesmith.result import Result
from tunesmith.stageio import StageIO


def run(io: StageIO) -> Result:
    group, groups = io.shard_of()  # {shard}-of-{shards} of this rule name its band group
    digests = io.many("digests")
    return minhash_jobs.minhash_buckets(io.input["filtered"], io.many("signatures"), io.section["dedupe"], group,
                                        groups, io.output["pairs"],
                                        gather_digests(digests, io.input["filtered"]) if digests else None)
