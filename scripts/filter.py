"""filter: drop empty / too short / too long / regex rows, every drop counted (with dataset.shards > 1:
the filter_shard jobs' rows and drops gathered)."""
from tunesmith.data import stages
from tunesmith.stage import run


def main(io):
    if io.many("shards"):
        return stages.gather_filtered(io.input["raw"], io.input["counts"], io.many("shards"), io.many("shard_reports"),
                                      io.section["filter"], io.output["filtered"], io.output["report"])
    return stages.filter_rows(io.input["raw"], io.input["counts"], io.section["filter"], io.output["filtered"],
                              io.output["report"])


if __name__ == "__main__":
    run(main)
