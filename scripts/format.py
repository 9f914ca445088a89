"""Entry for the format rule: prompt/completion conversations, held-out split, preview, template."""
from tunesmith import settings, tracking
from tunesmith.data import stages
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    section = io.params["section"]
    with tracking.stage_run("format", io.params, io.input, io.output, recipe=io.params["recipe"],
                            results_dir=settings.results_dir(), section=section) as rec:
        metrics = stages.format_rows(io.input["selected"], io.input["tokenizer"], section["format"],
                                     io.output["train"], io.output["eval"], io.output["preview"],
                                     io.output["template"])
        rec.log_metrics({**metrics, "seconds": metrics["load_seconds"] + metrics["work_seconds"]})
        rec.log_artifact(io.output["preview"])
        rec.log_artifact(io.output["template"])


if __name__ == "__main__":
    run(main, "format")
