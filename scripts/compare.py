"""Entry for the compare rule: the MLflow comparison across this config's recipes and variants.
By hand: tunesmith compare [--experiments ...] [--out results/compare]."""
from pathlib import Path

from tunesmith import compare, tracking
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    experiments = io.params.get("experiments") or None
    paths = compare.write(tracking.tracking_uri(), Path(io.output["md"]).parent, experiments)
    for kind, path in paths.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    run(main, "compare")
