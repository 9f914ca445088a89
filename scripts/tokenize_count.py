"""Entry for the tokenize_count rule: batched token counts, stats JSON and histogram."""
from tunesmith import settings, tracking
from tunesmith.data import stages
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    section = io.params["section"]
    with tracking.stage_run("tokenize_count", io.params, io.input, io.output, recipe=io.params["recipe"],
                            results_dir=settings.results_dir(), section=section) as rec:
        metrics = stages.tokenize_count(io.input["raw"], io.input["tokenizer"], section["tokenize"],
                                        io.output["counts"], io.output["stats"], io.output["hist"],
                                        recipe=io.params["recipe"])
        rec.log_metrics({**metrics, "seconds": metrics["load_seconds"] + metrics["work_seconds"]})
        rec.log_artifact(io.output["stats"])
        rec.log_artifact(io.output["hist"])


if __name__ == "__main__":
    run(main, "tokenize_count")
