"""Checkpoints the trainer resumes from: fingerprinted against what they were trained for, validated
before resume, and set aside when stale or corrupt (renamed, not deleted: a corrupt one for good, the
newest few stale sets)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from tunesmith import fileio

log = logging.getLogger("tunesmith.train")


CHECKPOINT_PREFIX = "checkpoint-"

FINGERPRINT = "tunesmith_fingerprint.json"

# Every train.* key of the recipe schema, by what a change to it means. This is the one list:
# the resume fingerprint, the train and merge rules' params and tests/test_checkpoints.py (which
# checks every schema key is here) all read it.
#   optimisation: what a checkpoint was trained for (fingerprinted: a change starts from step 0,
#                 the old checkpoints set aside). gpus/processes/nodes set the global batch, fsdp
#                 the checkpoint's format.
#   train:        the train stage reads it but a checkpoint stays valid (train.args' cadence keys
#                 are split out below: train reruns and resumes).
#   merge:        only the merge stage reads it (a change reruns merge, never training).
#   scheduling:   only the job's request to the scheduler (a change reruns nothing).
TRAIN_KEYS: dict[str, str] = {
    "method": "optimisation", "objective": "optimisation", "dpo": "optimisation", "kto": "optimisation",
    "grpo": "optimisation", "lora": "optimisation", "quantization": "optimisation", "args": "optimisation",
    "gpus": "optimisation", "processes": "optimisation", "nodes": "optimisation", "fsdp": "optimisation",
    "sample_prompts": "merge", "sample_max_new_tokens": "merge", "sample_eval_rows": "merge",
    "merge_tolerance": "merge",
    "gpu_model": "scheduling", "mem_mb": "scheduling", "runtime": "scheduling",
}
# train.args (and pretrain.args) keys outside the fingerprint: the cadence of logging, evaluation
# and saving, and how a step is computed without changing what it computes (memory for time, fused
# kernels, the eval batch), which one may well change to get a timed-out or out-of-memory run going.
ARGS_CADENCE = ("logging_steps", "eval_steps", "save_steps", "save_total_limit")
ARGS_COMPUTE = ("per_device_eval_batch_size", "gradient_checkpointing", "use_liger_kernel", "token_metrics",
                "fused_cross_entropy", "torch_compile", "auto_batch")

STALE_KEPT = 3  # sets of stale checkpoints kept beside checkpoints/ (checkpoints.stale-N)


def _without_cadence(args: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if k not in ARGS_CADENCE + ARGS_COMPUTE}


def resume_section(section: dict[str, Any]) -> dict[str, Any]:
    """The part of a stage's section a checkpoint must match: train keys of kind optimisation,
    train.args / pretrain.args without ARGS_CADENCE and ARGS_COMPUTE; other sections (model, pretrain) whole."""
    out = dict(section)
    if "train" in out:
        train = {k: v for k, v in out["train"].items() if TRAIN_KEYS.get(k) == "optimisation"}
        if "args" in train:
            train["args"] = _without_cadence(train["args"])
        out["train"] = train
    if isinstance(out.get("pretrain"), dict) and isinstance(out["pretrain"].get("args"), dict):
        out["pretrain"] = {**out["pretrain"], "args": _without_cadence(out["pretrain"]["args"])}
    return out


def stage_train_section(train: dict[str, Any], stage: str) -> dict[str, Any]:
    """The train.* keys a rule's params carry: stage train (and pretrain) without merge and
    scheduling keys; stage merge without scheduling keys (it loads the model as the method does)."""
    drop = {"train": ("merge", "scheduling"), "merge": ("scheduling",)}[stage]
    return {k: v for k, v in train.items() if TRAIN_KEYS.get(k) not in drop}


def fingerprint(section: dict[str, Any], files: dict[str, str | Path]) -> str:
    """What a checkpoint was trained from: a resume with other optimisation params or data would mix
    two runs. Only resume_section(section) counts: raising train.runtime after a timeout, or changing
    how often it logs or saves, keeps the checkpoints."""
    digest = hashlib.sha256(json.dumps(resume_section(section), sort_keys=True, default=str).encode())
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



def _set_aside_stale(folder: Path, why: str) -> None:
    """Rename a checkpoints folder that no longer matches to checkpoints.stale-N beside it (a change
    reverted brings them back by hand); only the STALE_KEPT newest such sets are kept."""
    taken = sorted((int(p.name.rsplit("-", 1)[1]), p) for p in folder.parent.glob(f"{folder.name}.stale-*")
                   if p.name.rsplit("-", 1)[1].isdigit())
    n = taken[-1][0] + 1 if taken else 1
    target = folder.with_name(f"{folder.name}.stale-{n}")
    folder.rename(target)
    log.warning("checkpoints in %s %s; starting from step 0, the old ones moved to %s", folder, why, target.name)
    for _, old in taken[: max(0, len(taken) + 1 - STALE_KEPT)]:
        log.warning("removing %s: only the %d newest sets of stale checkpoints are kept", old, STALE_KEPT)
        shutil.rmtree(old)


def prepare_checkpoints(folder: str | Path, fp: str) -> Path | None:
    """Return the checkpoint to resume from; checkpoints trained for other optimisation params or
    data are set aside (checkpoints.stale-N), never mixed into this run."""
    folder = Path(folder)
    stamp = folder / FINGERPRINT
    if folder.is_dir() and stamp.is_file():
        try:
            old = json.loads(stamp.read_text()).get("fingerprint")
        except ValueError:
            old = None
        if old != fp:
            _set_aside_stale(folder, "come from other optimisation params or data")
    elif folder.is_dir() and any(folder.glob(f"{CHECKPOINT_PREFIX}*")):
        _set_aside_stale(folder, "carry no fingerprint")
    folder.mkdir(parents=True, exist_ok=True)
    fileio.write_json(stamp, {"fingerprint": fp})
    return last_checkpoint(folder)



def tokens_seen(ckpt: Path) -> int:
    return int(json.loads((ckpt / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0))



def checkpoint_step(ckpt: Path) -> int:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return int(state.get("global_step", 0))
