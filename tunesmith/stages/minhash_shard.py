"""minhash_shard: MinHash signatures of one of dataset.shards slices of the filtered rows (dedupe.method
minhash or auto)."""

from __future__ import annotations

from tunesmith.data import minhash_jobs
from tunesmith.result import Result
from tunesmith.stageio import StageIO


def run(io: StageIO) -> Result:
    shard, shards = io.shard_of()
    return minhash_jobs.minhash_shard(io.input["filtered"], io.section["dedupe"], shard, shards,
                                      io.output["signatures"])
