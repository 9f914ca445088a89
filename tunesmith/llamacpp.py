"""llama.cpp as quantize and the GGUF evaluator both use it: where its converter lives, loading a
GGUF in process, and the log-softmax both sides of a logit comparison go through."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.errors import EnvironmentNotSupported, TunesmithError

ENV_LLAMA_CPP_DIR = "TUNESMITH_LLAMA_CPP_DIR"



def llama_cpp_dir() -> Path:
    """Where tools/setup_env.sh put llama.cpp's converter (from the llama-cpp-python sdist)."""
    path = Path(os.environ.get(ENV_LLAMA_CPP_DIR) or Path(sys.prefix) / "share" / "tunesmith" / "llama.cpp")
    if not (path / "convert_hf_to_gguf.py").is_file() or not (path / "gguf-py").is_dir():
        raise EnvironmentNotSupported(
            f"llama.cpp's GGUF converter is not at {path} (convert_hf_to_gguf.py + gguf-py). "
            f"Run tools/setup_env.sh, which extracts it from the llama-cpp-python sdist, or set "
            f"{ENV_LLAMA_CPP_DIR} to a llama.cpp checkout of the same version as llama-cpp-python.")
    return path



def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (llama.cpp's scores and HF logits compared alike)."""
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def open_llama(path: str | Path, *, n_ctx: int = 2048, threads: int = 2, logits_all: bool = True) -> Any:
    """Load a GGUF with llama.cpp; a file it rejects becomes a TunesmithError naming the file."""
    import llama_cpp

    path = Path(path)
    if not path.is_file():
        raise TunesmithError(f"GGUF file not found: {path}")
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_batch=512,
                               logits_all=logits_all, verbose=False, seed=0)
    except (ValueError, RuntimeError) as exc:
        raise TunesmithError(f"llama.cpp could not load {path}: {exc}") from None
