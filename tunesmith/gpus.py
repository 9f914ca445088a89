"""Which GPUs a local job runs on.

Snakemake's `--resources gpu=N` only counts GPUs: it never says which, so two GPU jobs running at
once on one machine both start on device 0. Before torch starts, a local GPU job claims free
devices with one lock file per device (held for the life of its process) and sets
CUDA_VISIBLE_DEVICES to them; processes it launches (accelerate) inherit the setting. SLURM gives
each job its own devices already, and a CUDA_VISIBLE_DEVICES the user set is left alone.

The locks live in a folder of the user's own (XDG_RUNTIME_DIR, else a 0700 folder per uid in the
temp dir), never in a folder others can write: there another user could plant a symlink that
the lock open would follow and truncate, or own the folder and make every claim fail. So jobs of
one user coordinate; jobs of different users on one machine do not (a shared GPU box needs SLURM
or CUDA_VISIBLE_DEVICES set per user)."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

from tunesmith.errors import EnvironmentNotSupported, TunesmithError

log = logging.getLogger("tunesmith.gpus")

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


def default_lock_dir() -> Path:
    """The user's own lock folder: under XDG_RUNTIME_DIR (a 0700 folder systemd makes per user)
    when it is set, else tunesmith-gpus-<uid> in the temp dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "tunesmith-gpus"
    return Path(tempfile.gettempdir()) / f"tunesmith-gpus-{os.getuid()}"


def usable_lock_dir(lock_dir: Path) -> Path:
    """Create lock_dir 0700 if missing; refuse one that is a symlink, not ours, or that others can
    write to, with the folder and the fix named (not a PermissionError from deep in a job)."""
    try:
        lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(lock_dir)
    except OSError as exc:
        raise TunesmithError(f"GPU lock folder {lock_dir} cannot be created ({exc.strerror}): set "
                             f"XDG_RUNTIME_DIR to a folder of your own, or CUDA_VISIBLE_DEVICES per job") from None
    problem = None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        problem = "is not a folder (a symlink or a file)"
    elif info.st_uid != os.getuid():
        problem = f"belongs to uid {info.st_uid}, not to you (uid {os.getuid()})"
    elif info.st_mode & 0o022:
        problem = f"can be written by other users (mode {stat.filemode(info.st_mode)})"
    if problem:
        raise TunesmithError(f"GPU lock folder {lock_dir} {problem}: remove it, or set XDG_RUNTIME_DIR to a "
                             f"folder of your own, or CUDA_VISIBLE_DEVICES per job")
    return lock_dir


def _open_lock(path: Path) -> IO[str]:
    # O_NOFOLLOW: a symlink planted at the lock's name is refused rather than followed; no
    # O_TRUNC: the lock is the flock, its content never matters.
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise TunesmithError(f"GPU lock file {path} cannot be opened ({exc.strerror}; a symlink is refused): "
                             f"remove it") from None
    return os.fdopen(fd, "r+")


def claim(n: int, total: int, lock_dir: Path | None = None, wait_s: float = 600.0) -> list[int]:
    """Lock n of devices 0..total-1 that no other process holds; wait up to wait_s for them."""
    if n > total:
        raise EnvironmentNotSupported(f"the job asks for {n} GPU(s) and this machine has {total}")
    lock_dir = usable_lock_dir(lock_dir or default_lock_dir())
    deadline = time.time() + wait_s
    while True:
        got: list[tuple[int, IO[str]]] = []
        for index in range(total):
            fh = _open_lock(lock_dir / f"gpu{index}.lock")
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
