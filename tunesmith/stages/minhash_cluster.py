"""minhash_cluster: verify the candidate pairs, cluster them, pick each cluster's kept row."""

from __future__ import annotations

from tunesmith.data import minhash_jobs
from tunesmith.data.duplicates import gather_digests
from tunesmith.result import Result
from tunesmith.stageio import StageIO


def run(io: StageIO) -> Result:
    digests = io.many("digests")
    return minhash_jobs.minhash_cluster(io.input["filtered"], io.many("signatures"), io.many("buckets"),
                                        io.section["dedupe"], io.output["clusters"],
                                        gather_digests(digests, io.input["filtered"]) if digests else None)
