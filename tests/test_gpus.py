"""Concurrent local GPU jobs get different devices: each claims free ones with a lock file per
device and sets CUDA_VISIBLE_DEVICES before torch starts. Locks are exercised for real (fcntl);
no GPU is needed to see which device a second job would get."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from tunesmith import gpus
from tunesmith.errors import EnvironmentNotSupported, TunesmithError

HOLD = """
import sys, time
from pathlib import Path
from tunesmith import gpus
print(gpus.claim(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), wait_s=0), flush=True)
time.sleep(60)
"""


def test_a_second_job_gets_the_devices_the_first_does_not_hold(tmp_path):
    first = subprocess.Popen([sys.executable, "-c", HOLD, "2", "3", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "[0, 1]"
        assert gpus.claim(1, 3, tmp_path, wait_s=0) == [2]
        with pytest.raises(EnvironmentNotSupported, match=r"1 free GPU\(s\) were not found.*--resources gpu=3"):
            gpus.claim(1, 3, tmp_path, wait_s=0)
    finally:
        first.kill()
        first.wait()
    # the first job ended: its devices are free again (the kernel drops a dead process's locks)
    assert gpus.claim(2, 3, tmp_path, wait_s=0) == [0, 1]
    with pytest.raises(EnvironmentNotSupported, match="asks for 4 GPU"):
        gpus.claim(4, 3, tmp_path)


def test_nothing_is_chosen_where_someone_else_chose(monkeypatch):
    monkeypatch.setattr(gpus, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert gpus.claim_for_job(1) is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("SLURM_JOB_ID", "42")  # SLURM's gres set the devices
    assert gpus.claim_for_job(1) is None
    monkeypatch.delenv("SLURM_JOB_ID")
    assert gpus.claim_for_job(0) is None


def test_locks_live_in_a_folder_of_the_users_own_and_follow_no_symlink(tmp_path, monkeypatch):
    """Another user's symlink at a lock's name is refused (the lock open used to follow it and
    truncate its target); a lock folder others can write, or that is not a folder, or that cannot be
    made is a named error, not a PermissionError from deep inside a GPU job."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert gpus.default_lock_dir() == tmp_path / "tunesmith-gpus"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert gpus.default_lock_dir().name == f"tunesmith-gpus-{os.getuid()}"

    locks = tmp_path / "locks"
    assert gpus.claim(1, 2, locks, wait_s=0) == [0]
    assert stat.S_IMODE(locks.stat().st_mode) == 0o700  # made for this user only
    gpus._held.pop().close()

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (locks / "gpu0.lock").unlink()
    (locks / "gpu0.lock").symlink_to(victim)
    with pytest.raises(TunesmithError, match=r"GPU lock file .*gpu0.lock cannot be opened .*a symlink is refused"):
        gpus.claim(1, 2, locks, wait_s=0)
    assert victim.read_text() == "precious"

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o1777)  # like /tmp itself
    with pytest.raises(TunesmithError, match=r"shared can be written by other users \(mode drwxrwxrwt\)"):
        gpus.claim(1, 2, shared, wait_s=0)
    link = tmp_path / "link"
    link.symlink_to(locks)
    with pytest.raises(TunesmithError, match="link is not a folder"):
        gpus.claim(1, 2, link, wait_s=0)
    (tmp_path / "afile").write_text("")
    with pytest.raises(TunesmithError, match=r"afile/locks cannot be created .*XDG_RUNTIME_DIR"):
        gpus.claim(1, 2, tmp_path / "afile" / "locks", wait_s=0)
    if os.getuid() == 0:  # root can hand a folder to another user, as another user's folder would be
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(TunesmithError, match="theirs belongs to uid 65534, not to you"):
            gpus.claim(1, 2, theirs, wait_s=0)
