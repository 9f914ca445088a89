"""Run the real workflow (snakemake in a subprocess) in a scratch working directory.

The scratch dir links the repository's data/ and resources/ (so the base model converted once
is reused across tests) and a ../shared beside it when the real one exists, then runs the
repository's Snakefile there with its own results/, logs/ and mlflow.db."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def make_workdir(tmp: Path) -> Path:
    work = tmp / "work"
    work.mkdir(parents=True, exist_ok=True)
    (REPO / "resources").mkdir(exist_ok=True)
    for name in ("data", "resources"):
        if not (work / name).exists():
            (work / name).symlink_to(REPO / name)
    if SHARED.is_dir() and not (tmp / "shared").exists():
        (tmp / "shared").symlink_to(SHARED)
    return work


def write_config(work: Path, cfg: dict) -> Path:
    cfg = {"recipes_dir": str(REPO / "recipes"), **cfg}
    path = work / "test-config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake(work: Path, config: Path, *args: str, timeout: int = 3000,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    full_env.pop("TUNESMITH_INVOCATION", None)
    # Targets and extra flags go first: --resources takes any number of values and would swallow
    # a target written after it.
    cmd = [SNAKEMAKE, *args, "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(config), "--cores", "2", "--resources", "gpu=1"]
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout, env=full_env)


def failure_text(proc: subprocess.CompletedProcess, work: Path) -> str:
    """The end of snakemake's output plus every rule log, for an assertion message."""
    logs = "\n".join(f"--- {p}\n{p.read_text()[-2500:]}" for p in sorted((work / "logs").rglob("*.log")))
    return f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}\n{logs[-12000:]}"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def mlflow_runs(db: Path) -> list[dict]:
    """Runs with their tags, read straight from the SQLite store (no mlflow import needed)."""
    con = sqlite3.connect(db)
    try:
        runs = {r[0]: {"run_id": r[0], "name": r[1], "status": r[2], "experiment": r[3], "tags": {}}
                for r in con.execute("select r.run_uuid, r.name, r.status, e.name from runs r "
                                     "join experiments e on e.experiment_id = r.experiment_id")}
        for run_id, key, value in con.execute("select run_uuid, key, value from tags"):
            if run_id in runs:
                runs[run_id]["tags"][key] = value
        return list(runs.values())
    finally:
        con.close()
