"""Where a result came from: the code's git commit and the key libraries' versions, written into
tracking tags and model cards alike."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]



# scheme://user:password@host (or scheme://token@host): what a dataset URL or a tracking URI may carry.
_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact_credentials(text: str) -> str:
    """Text without the credentials of any URL in it (scheme://***@host): for everything recorded
    (MLflow params and tags, model cards, lineage), one rule for all of them."""
    return _CREDENTIALS.sub(r"\1***@", text)


KEY_LIBRARIES = (
    "torch", "transformers", "peft", "trl", "datasets", "accelerate", "sentence-transformers",
    "faiss-cpu", "lm-eval", "llama-cpp-python", "mlflow", "snakemake", "bitsandbytes",
)



def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"



def library_versions() -> dict[str, str]:
    out = {}
    for name in KEY_LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
