"""The script of every rule: runs tunesmith.stages.<rule>.run through the runner (tunesmith.runner),
which reads the rule, its files and params from Snakemake's object.

By hand, the same stage outside Snakemake (see `python scripts/stage.py --help`):
    python scripts/stage.py filter --recipe demo --input raw=results/demo/data/raw.parquet \
        --input counts=results/demo/data/token_counts.parquet --output filtered=/tmp/f.parquet \
        --output report=/tmp/r.json --params params.json
"""
from tunesmith.runner import main

if __name__ == "__main__":
    main()
