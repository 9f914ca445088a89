"""compare: the MLflow comparison across this config's recipes and variants.
By hand: tunesmith compare [--experiments ...] [--out results/compare]."""
from tunesmith import compare, tracking
from tunesmith.stage import run


def main(io):
    return compare.stage(tracking.tracking_uri(), io.output, io.params["experiments"] or None)


if __name__ == "__main__":
    run(main)
