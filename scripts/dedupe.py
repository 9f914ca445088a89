"""dedupe: exact hash, then near duplicates (embeddings with faiss, or the MinHash clusters)."""
from tunesmith import settings
from tunesmith.data import stages
from tunesmith.stage import run


def main(io):
    return stages.dedupe(io.input["filtered"], io.section["dedupe"], io.output["deduped"], io.output["report"],
                         io.output["hist"], offline=settings.offline(), recipe=io.recipe,
                         embeddings=io.many("embeddings"), digests=io.many("digests"),
                         clusters=io.one("clusters"))


if __name__ == "__main__":
    run(main)
