"""minhash_cluster: verify the candidate pairs, cluster them, pick each cluster's kept row."""
from tunesmith.data import minhash_stages, stages
from tunesmith.stage import run


def main(io):
    digests = io.many("digests")
    return minhash_stages.minhash_cluster(io.input["filtered"], io.many("signatures"), io.many("buckets"),
                                          io.section["dedupe"], io.output["clusters"],
                                          stages.gather_digests(digests, io.input["filtered"]) if digests else None)


if __name__ == "__main__":
    run(main)
