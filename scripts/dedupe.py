"""Entry for the dedupe rule: exact hash, then embedding near-duplicates with faiss."""
from tunesmith import settings, tracking
from tunesmith.data import stages
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    section = io.params["section"]
    with tracking.stage_run("dedupe", io.params, io.input, io.output, recipe=io.params["recipe"],
                            results_dir=settings.results_dir(), section=section) as rec:
        metrics = stages.dedupe(io.input["filtered"], section["dedupe"], io.output["deduped"], io.output["report"],
                                io.output["hist"], offline=bool(io.params.get("offline", settings.offline())),
                                recipe=io.params["recipe"])
        rec.log_metrics({**metrics, "seconds": metrics["load_seconds"] + metrics["work_seconds"]})
        rec.log_artifact(io.output["report"])
        rec.log_artifact(io.output["hist"])


if __name__ == "__main__":
    run(main, "dedupe")
