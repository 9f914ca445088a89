"""compare: every recipe's runs side by side (scores, loss, rows kept, seconds per stage), read back
from MLflow into a table and a plot. The one stage that reads the tracking store."""

from __future__ import annotations

from pathlib import Path

from tunesmith import leaderboard, settings, tracking, tracking_writer
from tunesmith.result import Result
from tunesmith.stageio import StageIO


def run(io: StageIO) -> Result:
    experiments = io.params["experiments"] or None
    # The workflow's tracking writer may not have pushed the last stages' records yet: push them
    # here (the push lock makes one run per record) so the comparison sees every stage.
    _, waiting = tracking_writer.push_waiting(experiments or [], settings.results_dir())
    uri, out_dir = tracking.tracking_uri(), Path(io.output["md"]).parent
    try:
        paths = leaderboard.write(uri, out_dir, experiments)
    except Exception as exc:  # noqa: BLE001
        if not waiting:  # the store took every record: a failure to read it back is a real one
            raise
        # The store is down (the records could not be pushed either): every stage before this one
        # finished and its record waits in its file, so the comparison says how to make it later
        # instead of failing the workflow.
        paths = leaderboard.write_unreachable(uri, out_dir, waiting, exc)
    return Result(summary=", ".join(f"{kind}: {path}" for kind, path in paths.items()))
