"""Which process this is in a multi-process run (accelerate / torch.distributed set the variables):
rank 0 alone writes outputs and tracking."""

from __future__ import annotations

import os
import sys


def world_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))



def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))



def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))



def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or "ACCELERATE_PROCESS_NUM" in os.environ



def die_with_launcher() -> None:
    """Under a launcher: have the kernel kill this rank when its launcher dies. torch.distributed.run
    starts every rank in a session of its own, so a kill -9 of the job's process group (a
    scheduler, a user) would leave the ranks training on, beside the rerun. Linux only."""
    if not under_launcher() or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the call
        os.kill(os.getpid(), signal.SIGKILL)
