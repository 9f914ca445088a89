"""Entry for the select rule: all rows, the top-k longest, or a seeded random k."""
import sys
from pathlib import Path

# Run by hand as `python scripts/select.py`, this folder comes first on sys.path and this file
# would shadow the standard library's `select` (imported by subprocess): drop the folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from tunesmith import settings, tracking  # noqa: E402
from tunesmith.data import stages  # noqa: E402
from tunesmith.stage import StageIO, run  # noqa: E402


def main(io: StageIO) -> None:
    section = io.params["section"]
    with tracking.stage_run("select", io.params, io.input, io.output, recipe=io.params["recipe"],
                            results_dir=settings.results_dir(), section=section) as rec:
        metrics = stages.select(io.input["deduped"], section["select"], io.output["selected"], io.output["report"])
        rec.log_metrics({**metrics, "seconds": metrics["load_seconds"] + metrics["work_seconds"]})
        rec.log_artifact(io.output["report"])


if __name__ == "__main__":
    run(main, "select")
