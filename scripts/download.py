"""download: dataset.source -> canonical raw.parquet + source.json."""
from tunesmith import settings
from tunesmith.data import stages
from tunesmith.stage import run


def main(io):
    return stages.download(io.section["dataset"], io.output["raw"], io.output["source"], offline=settings.offline())


if __name__ == "__main__":
    run(main)
