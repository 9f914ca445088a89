"""Which GPUs a local job runs on.

Snakemake's `--resources gpu=N` only counts GPUs: it never says which, so two GPU jobs running at
once on one machine both start on device 0. Before torch starts, a local GPU job claims free
devices with one lock file per device (held for the life of its process) and sets
CUDA_VISIBLE_DEVICES to them; processes it launches (accelerate) inherit the setting. SLURM gives
each job its own devices already, and a CUDA_VISIBLE_DEVICES the user set is left alone."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

from tunesmith.errors import EnvironmentNotSupported

log = logging.getLogger("tunesmith.gpus")

LOCK_DIR = Path(tempfile.gettempdir()) / "tunesmith-gpus"
_held: list[IO[str]] = []  # open lock files: a claim lasts as long as the process


def device_count() -> int:
    """GPUs on this machine, from nvidia-smi (torch must not start CUDA before the claim)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def claim(n: int, total: int, lock_dir: Path = LOCK_DIR, wait_s: float = 600.0) -> list[int]:
    """Lock n of devices 0..total-1 that no other process holds; wait up to wait_s for them."""
    if n > total:
        raise EnvironmentNotSupported(f"the job asks for {n} GPU(s) and this machine has {total}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + wait_s
    while True:
        got: list[tuple[int, IO[str]]] = []
        for index in range(total):
            fh = open(lock_dir / f"gpu{index}.lock", "w")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            got.append((index, fh))
            if len(got) == n:
                _held.extend(f for _, f in got)
                return [i for i, _ in got]
        for _, fh in got:  # not enough free: give back what was taken, so two jobs cannot deadlock
            fh.close()
        if time.time() >= deadline:
            raise EnvironmentNotSupported(
                f"{n} free GPU(s) were not found in {wait_s:.0f} s: other jobs hold the rest of the {total} "
                f"(locks in {lock_dir}). Run fewer GPU jobs at once (snakemake --resources gpu={total})")
        time.sleep(2.0)


def claim_for_job(gpus: int) -> list[int] | None:
    """Claim devices for a local job that asked Snakemake for `gpus`; None where nothing is chosen
    here (no GPU asked for, SLURM, CUDA_VISIBLE_DEVICES already set, one GPU or none)."""
    if gpus <= 0 or "CUDA_VISIBLE_DEVICES" in os.environ or os.environ.get("SLURM_JOB_ID"):
        return None
    total = device_count()
    if total <= 1:
        return None
    ids = claim(gpus, total)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, ids))
    log.info("GPUs %s of %d claimed for this job (CUDA_VISIBLE_DEVICES)", os.environ["CUDA_VISIBLE_DEVICES"], total)
    return ids
