"""Pieces of the trainer loop (tunesmith.trainer): device and method checks, the multi-GPU relaunch,
checkpoints validated before resume, the loss-history callback, memory figures and the loss plot."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tunesmith.errors import EnvironmentNotSupported, TunesmithError

log = logging.getLogger("tunesmith.train")

CHECKPOINT_PREFIX = "checkpoint-"
FINGERPRINT = "tunesmith_fingerprint.json"


# ---------------------------------------------------------------- device

def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def require_device(method: str) -> bool:
    """Return whether CUDA is here; stop at once when the method cannot run without it.

    Decided from torch, never from the scheduler's gpu resource (Snakemake scales that down silently)."""
    from tunesmith.methods import get

    entry = get(method)
    cuda = cuda_available()
    if entry.needs_cuda and not cuda:
        raise EnvironmentNotSupported(
            f"train.method '{method}' needs a CUDA GPU and torch sees none ({entry.cuda_why}). "
            f"On this machine use 'method: lora' (same adapter, 16/32-bit base), "
            f"or run the train rule on a GPU node (--resources gpu=1 / the slurm profile).")
    return cuda


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


def launch_command(script: str | Path, processes: int, io: Any, params_file: Path, port: int, *,
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
            "--dynamo_backend", "no", str(script), "--params", str(params_file), "--stage", io.stage,
            "--recipe", io.recipe]
    if io.variant:
        cmd += ["--variant", io.variant]
    for flag, files in (("--input", io.input), ("--output", io.output)):
        for k, v in files.items():
            cmd += [flag, f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"]
    return cmd


def srun_command(launch: list[str], nodes: int, cpus_per_node: int, gpus_per_node: int) -> list[str]:
    """srun starts one accelerate launcher per node of the job's allocation; each reads its machine
    rank (SLURM_NODEID) and the main process's address (SLURM_LAUNCH_NODE_IPADDR: the node this
    srun runs on) from the environment SLURM gives the task."""
    cmd = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", f"--cpus-per-task={cpus_per_node}",
           "--kill-on-bad-exit=1", "--export=ALL"]
    if gpus_per_node:
        cmd.append(f"--gpus-per-task={gpus_per_node}")
    # The launcher's shell on each node expands the $SLURM_ variables; everything else is quoted.
    line = " ".join(f'"{a}"' if a.startswith("$SLURM_") else shlex.quote(a) for a in launch)
    return cmd + ["bash", "-c", line]


def relaunch(script: str | Path, train_cfg: dict[str, Any], io: Any) -> Any:
    """Run `script` again under `accelerate launch`, one process per GPU (or train.processes on CPU),
    with this job's inputs, outputs and params passed by argv (the child cannot see Snakemake's
    object). Inside a SLURM job the launchers start through srun, one per node."""
    import subprocess

    cuda = cuda_available()
    fsdp = bool(train_cfg["fsdp"])  # scripts/train.py has refused it on CPU (check_fsdp) before relaunching
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
    params_file.write_text(json.dumps(io.params, default=str))
    port = free_port() if not in_slurm else 20000 + int(os.environ["SLURM_JOB_ID"]) % 20000
    if in_slurm:
        launch = launch_command(script, nodes * per_node, io, params_file, port, nodes=nodes,
                                machine=("$SLURM_NODEID", "$SLURM_LAUNCH_NODE_IPADDR"), fsdp=fsdp)
        cmd = srun_command(launch, nodes, max(1, int(io.threads)) * per_node, per_node if cuda else 0)
    else:
        cmd = launch_command(script, per_node, io, params_file, port, fsdp=fsdp)
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
    from tunesmith.result import Result

    return Result(delegated=True, summary=f"ran under accelerate on {what}")


# ---------------------------------------------------------------- checkpoints

def fingerprint(section: dict[str, Any], files: dict[str, str | Path]) -> str:
    """What a checkpoint was trained from: a resume with other params or data would mix two runs."""
    digest = hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode())
    for name in sorted(files):
        path = Path(files[name])
        if path.is_dir():
            for sub in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".jinja")):
                digest.update(f"{name}/{sub.name}".encode() + sub.read_bytes())
        elif path.is_file():
            digest.update(name.encode() + path.read_bytes())
    return digest.hexdigest()


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None. Every file the resume reads is opened:
    a full disk or a crash mid-save leaves files that exist but are cut short."""
    state = ckpt / "trainer_state.json"
    if not state.is_file():
        return "trainer_state.json is missing (killed while saving?)"
    try:
        if "global_step" not in json.loads(state.read_text()):
            return "trainer_state.json has no global_step"
    except (ValueError, OSError) as exc:
        return f"trainer_state.json does not parse ({exc})"
    weights = sorted(ckpt.glob("*.safetensors"))
    if not weights:
        return "no *.safetensors weights"
    from safetensors import safe_open

    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    fh.get_slice(key)
        except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError alike
            return f"{path.name} does not load ({_first_line(exc)})"
    import torch

    for name in ("optimizer.pt", "scheduler.pt"):
        path = ckpt / name
        if path.is_file():
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - a truncated zip, a pickle error
                return f"{name} does not load ({_first_line(exc)})"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160]}" if text else type(exc).__name__


def _set_aside(ckpt: Path, why: str) -> None:
    target = ckpt.with_name(ckpt.name + ".corrupt")
    n = 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{ckpt.name}.corrupt{n}")
    ckpt.rename(target)
    log.warning("checkpoint %s is unusable: %s; moved aside to %s", ckpt, why, target.name)


def last_checkpoint(folder: str | Path, *, validate: bool = True) -> Path | None:
    """The newest checkpoint that loads; unusable newer ones are moved aside as checkpoint-N.corrupt
    (rank 0 only: other ranks take the newest one left, after rank 0 has looked)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted(((int(sub.name[len(CHECKPOINT_PREFIX):]), sub) for sub in folder.iterdir()
                    if sub.is_dir() and sub.name.startswith(CHECKPOINT_PREFIX)
                    and sub.name[len(CHECKPOINT_PREFIX):].isdigit()), reverse=True)
    for _, ckpt in found:
        why = checkpoint_problem(ckpt) if validate else None
        if why is None:
            return ckpt
        _set_aside(ckpt, why)
    return None


def prepare_checkpoints(folder: str | Path, fp: str) -> Path | None:
    """Return the checkpoint to resume from, discarding checkpoints of a different recipe/data."""
    folder = Path(folder)
    stamp = folder / FINGERPRINT
    if folder.is_dir() and stamp.is_file():
        old = json.loads(stamp.read_text()).get("fingerprint")
        if old != fp:
            log.warning("checkpoints in %s come from other params or data; starting from step 0", folder)
            shutil.rmtree(folder)
    elif folder.is_dir() and any(folder.glob(f"{CHECKPOINT_PREFIX}*")):
        log.warning("checkpoints in %s carry no fingerprint; starting from step 0", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"fingerprint": fp}))
    return last_checkpoint(folder)


def tokens_seen(ckpt: Path) -> int:
    return int(json.loads((ckpt / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0))


def checkpoint_step(ckpt: Path) -> int:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return int(state.get("global_step", 0))


# ---------------------------------------------------------------- figures

def peak_memory_mb(cuda: bool) -> dict[str, float]:
    """Peak allocated CUDA memory on GPU (what the tensors needed; reserved, which includes the
    allocator's cache, beside it as the Unsloth notebooks report it); peak RSS on CPU."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    out = {"peak_rss_mb": round(rss, 1)}
    if cuda:
        import torch

        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["peak_cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        out["peak_memory_mb"] = out["peak_cuda_allocated_mb"]
    else:
        out["peak_memory_mb"] = out["peak_rss_mb"]
    return out


def parameter_counts(model: Any) -> dict[str, float]:
    if hasattr(model, "get_nb_trainable_parameters"):  # peft: counts 4-bit packed weights right
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": int(trainable), "total_params": int(total),
            "trainable_share": float(trainable) / float(total) if total else 0.0}


def make_history_callback():
    """A TrainerCallback that keeps (step, loss) and (step, eval_loss), logs one line per log, and
    times every optimizer step (for throughput without warm-up, evaluation or the final save)."""
    from transformers import TrainerCallback

    class History(TrainerCallback):
        def __init__(self) -> None:
            self.train: list[tuple[int, float]] = []
            self.eval: list[tuple[int, float]] = []
            self.steps: list[tuple[int, float, int]] = []  # (step, time at its end, tokens seen)
            self.started = time.time()
            self.first_step: int | None = None
            self.cuda = cuda_available()

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.time()
            self.first_step = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            if self.cuda:  # kernels run ahead of the host: time what finished
                import torch

                torch.cuda.synchronize()
            self.steps.append((state.global_step, time.time(), int(getattr(state, "num_input_tokens_seen", 0) or 0)))

        def steady_rate(self, warmup: int = 3) -> dict[str, float | None]:
            """Tokens/s and s/step over the steps after the first `warmup` (compilation, allocator
            growth, first batches), ending at the last step's end: evaluation and saves in between
            count, the final save does not."""
            steps = self.steps[min(warmup, max(0, len(self.steps) - 2)):]
            if len(steps) < 2 or steps[-1][1] <= steps[0][1]:
                return {"steady_tokens_per_second": None, "steady_seconds_per_step": None}
            seconds = steps[-1][1] - steps[0][1]
            return {"steady_tokens_per_second": (steps[-1][2] - steps[0][2]) / seconds,
                    "steady_seconds_per_step": seconds / (steps[-1][0] - steps[0][0])}

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                self.train.append((state.global_step, float(logs["loss"])))
                done = state.global_step - (self.first_step or 0)
                rate = (time.time() - self.started) / done if done else float("nan")
                log.info("step %d/%d loss %.4f lr %.3g (%.2f s/step)", state.global_step, state.max_steps,
                         logs["loss"], logs.get("learning_rate", float("nan")), rate)
            if "eval_loss" in logs:
                self.eval.append((state.global_step, float(logs["eval_loss"])))
                log.info("step %d eval_loss %.4f", state.global_step, logs["eval_loss"])

    return History()


def first_eval_callback(keep: Any):
    """A TrainerCallback that keeps the first evaluation's metrics (eval_on_start's, before step one
    of this run) and hands them to `keep` at once, so that a crash after it does not lose them."""
    from transformers import TrainerCallback

    class FirstEval(TrainerCallback):
        metrics: dict[str, Any] | None = None

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if self.metrics is None and metrics is not None:
                self.metrics = dict(metrics)
                log.info("eval loss before training: %.4f", self.metrics["eval_loss"])
                keep(self.metrics)

    return FirstEval()


def full_history(trainer: Any) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """Loss history from the trainer state (it survives a resume, unlike a fresh callback's)."""
    train, evals = [], []
    for entry in trainer.state.log_history:
        if "loss" in entry and "step" in entry:
            train.append((int(entry["step"]), float(entry["loss"])))
        if "eval_loss" in entry and "step" in entry:
            evals.append((int(entry["step"]), float(entry["eval_loss"])))
    return train, evals


def objective_histories(log_history: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) curves of the train-time figures an objective logs beside the loss, in the order
    of `names`; a name ending in '/' takes every logged key under it (GRPO's rewards/<function>/mean)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for name in names:
        for entry in log_history:
            if "step" not in entry or "loss" not in entry:  # train logs only; eval logs carry eval_ keys
                continue
            keys = sorted(k for k in entry if k.startswith(name)) if name.endswith("/") else [name] if name in entry else []
            for key in keys:
                value = entry[key]
                if isinstance(value, (int, float)) and value == value:  # NaN: a batch without that kind of row
                    curves.setdefault(key, []).append((int(entry["step"]), float(value)))
    return curves


def plot_histories(curves: dict[str, list[tuple[int, float]]], path: str | Path, title: str) -> None:
    """One small panel per curve (rewards/chosen, rewards/margins, reward, ...), sharing the step axis."""
    from tunesmith.fileio import pyplot, save_figure

    plt = pyplot()
    names = list(curves) or ["(none)"]
    cols = 2 if len(names) > 1 else 1
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 2.6 * rows), squeeze=False, sharex=True)
    for ax, name in zip(axes.flat, names):
        points = curves.get(name, [])
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], marker=".")
        else:
            ax.text(0.5, 0.5, "no logged steps", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_loss(train: list[tuple[int, float]], evals: list[tuple[int, float]], path: str | Path, title: str) -> None:
    from tunesmith.fileio import pyplot

    plt = pyplot()

    from tunesmith.fileio import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], marker=".", label="train loss")
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], marker="o", linestyle="--", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no logged steps", ha="center", va="center", transform=ax.transAxes)
    save_figure(fig, path)
    plt.close(fig)
