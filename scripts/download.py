"""Entry for the download rule: dataset.source -> canonical raw.parquet + source.json."""
from tunesmith import settings, tracking
from tunesmith.data import stages
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    section = io.params["section"]
    with tracking.stage_run("download", io.params, io.input, io.output, recipe=io.params["recipe"],
                            results_dir=settings.results_dir(), section=section) as rec:
        metrics = stages.download(section["dataset"], io.output["raw"], io.output["source"],
                                  offline=bool(io.params.get("offline", settings.offline())))
        rec.log_metrics({**metrics, "seconds": metrics["load_seconds"] + metrics["work_seconds"]})
        rec.log_artifact(io.output["source"])


if __name__ == "__main__":
    run(main, "download")
