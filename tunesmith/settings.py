"""Settings that travel from the Snakefile to every job through the environment.

Jobs re-read the Snakefile (locally and on SLURM nodes); values that must be the same across
one invocation (its MLflow parent run id key) are set once here and inherited, never recomputed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tunesmith import tracking


def configure_environment(cfg: dict[str, Any], workdir: str | Path = ".") -> None:
    tracking.configure_env(cfg["tracking"], workdir=workdir)
    os.environ["TUNESMITH_RESULTS"] = cfg["results_dir"]
    os.environ["TUNESMITH_OFFLINE"] = "1" if cfg["offline"] else "0"
    if cfg["offline"]:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # Training is deterministic per seed; tokenizers' own threads fight the trainer's for 2 cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def results_dir() -> str:
    return os.environ.get("TUNESMITH_RESULTS", "results")


def offline() -> bool:
    return os.environ.get("TUNESMITH_OFFLINE", "1") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
