"""The multi-process train job: when to relaunch, and how (accelerate launch, one launcher per node
through srun inside SLURM), with the job's inputs, outputs and params passed by argv."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from tunesmith.errors import EnvironmentNotSupported, TunesmithError
from tunesmith.fileio import write_json
from tunesmith.methods import cuda_available
from tunesmith.ranks import under_launcher
from tunesmith.result import Result
from tunesmith.stageio import to_argv

log = logging.getLogger("tunesmith.train")


def processes_per_node(train_cfg: dict[str, Any], cuda: bool) -> int:
    """One process per GPU on CUDA (train.gpus), train.processes on CPU."""
    if cuda:
        return max(1, int(train_cfg["gpus"] or 1))
    return max(1, int(train_cfg["processes"]))



def needs_relaunch(train_cfg: dict[str, Any]) -> bool:
    """More than one process asked for (GPUs, CPU processes or nodes), or FSDP (which accelerate's
    launcher sets up, even for one GPU), and not yet under a launcher."""
    total = int(train_cfg["nodes"]) * processes_per_node(train_cfg, cuda_available())
    return (total > 1 or bool(train_cfg["fsdp"])) and not under_launcher()



def check_fsdp(train_cfg: dict[str, Any], cuda: bool) -> None:
    """train.fsdp needs CUDA: with use_cpu accelerate runs the ranks as MULTI_CPU and wraps the model
    in DDP whatever --use_fsdp says (accelerate 1.15, tried with 2 gloo ranks), so FSDP on CPU would
    silently be DDP."""
    if train_cfg["fsdp"] and not cuda:
        raise EnvironmentNotSupported("train.fsdp shards the model over CUDA ranks; accelerate has no FSDP for CPU "
                                      "processes (it would run them as DDP). On CPU use train.processes "
                                      "(data-parallel) and set fsdp: false")



def launcher_flags(processes: int, fsdp: bool) -> list[str]:
    """How accelerate launch starts the ranks: DDP (--multi_gpu: torch.distributed.run; gloo when the
    trainer's use_cpu is set), or FSDP2 with each of the model's no-split modules (its decoder
    layers) a unit and the full state dict gathered for saving, so the saved model and checkpoints
    are ordinary safetensors."""
    if not fsdp:
        return ["--multi_gpu", "--num_processes", str(processes)]
    return ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
            "--fsdp_reshard_after_forward", "true", "--fsdp_state_dict_type", "FULL_STATE_DICT",
            "--num_processes", str(processes)]



def free_port() -> int:
    """A free TCP port for the rendezvous: two jobs on one node must not share accelerate's 29500."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])



def launch_command(processes: int, io: Any, params_file: Path, port: int, *,
                   nodes: int = 1, machine: tuple[str, str] | None = None, fsdp: bool = False) -> list[str]:
    """accelerate launch with everything on the command line: the user's default accelerate
    config (another machine's GPU count, fp16, DeepSpeed) must not decide how this job runs.
    `processes` counts every rank on every node (accelerate's meaning); `machine` is
    (machine rank, main process address), given as shell variables when srun starts one launcher
    per node. See launcher_flags for DDP or FSDP."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher_flags(processes, fsdp),
           "--num_machines", str(nodes), "--machine_rank", machine[0] if machine else "0",
           "--main_process_port", str(port)]
    if machine:
        cmd += ["--main_process_ip", machine[1]]
    cmd += ["--mixed_precision", "no",  # the trainer's bf16/fp16 arguments decide precision
            "--dynamo_backend", "no", "-m", "tunesmith.runner", *to_argv(io, params_file)]
    return cmd



MACHINE_VARS = ("$SLURM_NODEID", "$SLURM_LAUNCH_NODE_IPADDR")  # (machine rank, main process address)


def srun_command(launch: list[str], nodes: int, cpus_per_node: int, gpus_per_node: int) -> list[str]:
    """srun starts one accelerate launcher per node of the job's allocation; each reads its machine
    rank (SLURM_NODEID) and the main process's address (SLURM_LAUNCH_NODE_IPADDR: the node this
    srun runs on) from the environment SLURM gives the task."""
    cmd = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", f"--cpus-per-task={cpus_per_node}",
           "--kill-on-bad-exit=1", "--export=ALL"]
    if gpus_per_node:
        cmd.append(f"--gpus-per-task={gpus_per_node}")
    # The launcher's shell on each node expands the two machine variables relaunch puts there;
    # everything else is quoted, a path or value of the user's that starts with $SLURM_ too.
    line = " ".join(a if a in MACHINE_VARS else shlex.quote(a) for a in launch)
    return cmd + ["bash", "-c", line]



def relaunch(train_cfg: dict[str, Any], io: Any) -> Any:
    """Run the stage again (the runner as a module) under `accelerate launch`, one process per GPU (or train.processes on CPU),
    with this job's inputs, outputs and params passed by argv (the child cannot see Snakemake's
    object). Inside a SLURM job the launchers start through srun, one per node."""
    import subprocess

    cuda = cuda_available()
    fsdp = bool(train_cfg["fsdp"])  # the train stage has refused it on CPU (check_fsdp) before relaunching
    per_node, nodes = processes_per_node(train_cfg, cuda), int(train_cfg["nodes"])
    in_slurm = "SLURM_JOB_ID" in os.environ
    if nodes > 1 and not in_slurm:
        raise EnvironmentNotSupported(f"train.nodes is {nodes}: multi-node training starts through srun inside a SLURM "
                                      f"job (--workflow-profile workflow/profiles/slurm); outside SLURM use nodes: 1")
    if cuda and not in_slurm:
        import torch

        have = torch.cuda.device_count()
        if have < per_node:
            raise EnvironmentNotSupported(f"train.gpus is {per_node} but torch sees {have} CUDA device(s) on this node")
    ckpt = Path(io.output["metrics"]).parent
    ckpt.mkdir(parents=True, exist_ok=True)
    params_file = ckpt / ".launch_params.json"
    write_json(params_file, io.params)
    port = free_port() if not in_slurm else 20000 + int(os.environ["SLURM_JOB_ID"]) % 20000
    if in_slurm:
        launch = launch_command(nodes * per_node, io, params_file, port, nodes=nodes,
                                machine=MACHINE_VARS, fsdp=fsdp)
        cmd = srun_command(launch, nodes, max(1, int(io.threads)) * per_node, per_node if cuda else 0)
    else:
        cmd = launch_command(per_node, io, params_file, port, fsdp=fsdp)
    what = f"{nodes} node(s) x {per_node} {'GPU' if cuda else 'CPU'} process(es)" + (", FSDP" if fsdp else "")
    log.info("data-parallel: relaunching under accelerate on %s: %s", what, " ".join(cmd))
    # PYTHONSAFEPATH: keep scripts/ off sys.path in every rank, as Snakemake's script runner does.
    # OMP_NUM_THREADS: torch.distributed.run sets 1 per process when unset. Locally the job's threads
    # are shared among its processes; a SLURM job has threads CPUs per task, one task per rank.
    env = dict(os.environ, PYTHONSAFEPATH="1")
    threads = max(1, int(io.threads) if in_slurm else int(io.threads) // per_node)
    env.setdefault("OMP_NUM_THREADS", str(1 if cuda else threads))
    rc = subprocess.run(cmd, check=False, env=env).returncode
    if rc != 0:
        raise TunesmithError(f"accelerate launch on {what} failed (exit {rc}); see the log above")

    return Result(delegated=True, summary=f"ran under accelerate on {what}")
