"""Checkpoints the trainer resumes from: fingerprinted against what they were trained for, validated
before resume, and set aside (never deleted) when stale or corrupt."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger("tunesmith.train")


CHECKPOINT_PREFIX = "checkpoint-"



FINGERPRINT = "tunesmith_fingerprint.json"



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
