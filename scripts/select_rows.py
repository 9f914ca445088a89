"""Entry for the select rule: all rows, the top-k longest, or a seeded random k.

Not named scripts/select.py: run by hand, scripts/ comes first on sys.path, and a select.py there
shadows the standard library's `select` module for every entry script (subprocess imports it)."""
from tunesmith import settings, tracking
from tunesmith.data import stages
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    section = io.params["section"]
    with tracking.stage_run("select", io.params, io.input, io.output, recipe=io.params["recipe"],
                            results_dir=settings.results_dir(), section=section) as rec:
        metrics = stages.select(io.input["deduped"], section["select"], io.output["selected"], io.output["report"])
        rec.log_metrics({**metrics, "seconds": metrics["load_seconds"] + metrics["work_seconds"]})
        rec.log_artifact(io.output["report"])


if __name__ == "__main__":
    run(main, "select")
