"""Entry for the filter rule: drop empty / too short / too long / regex rows, every drop counted."""
from tunesmith import settings, tracking
from tunesmith.data import stages
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    section = io.params["section"]
    with tracking.stage_run("filter", io.params, io.input, io.output, recipe=io.params["recipe"],
                            results_dir=settings.results_dir(), section=section) as rec:
        metrics = stages.filter_rows(io.input["raw"], io.input["counts"], section["filter"],
                                     io.output["filtered"], io.output["report"])
        rec.log_metrics({**metrics, "seconds": metrics["load_seconds"] + metrics["work_seconds"]})
        rec.log_artifact(io.output["report"])


if __name__ == "__main__":
    run(main, "filter")
