"""Concurrent local GPU jobs get different devices: each claims free ones with a lock file per
device and sets CUDA_VISIBLE_DEVICES before torch starts. Locks are exercised for real (fcntl);
no GPU is needed to see which device a second job would get."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunesmith import gpus
from tunesmith.errors import EnvironmentNotSupported

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
