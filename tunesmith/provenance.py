"""Where a result came from: the code's git commit and the key libraries' versions, written into
tracking tags and model cards alike."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]



# Query parameters that carry a secret in common dataset URLs (tokens, presigned S3/GCS/Azure links).
_SECRET_QUERY = re.compile(r"([?&](?:[a-z0-9_.-]*token|api[_-]?key|key|sig|signature|password|secret|"
                           r"x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
                           r"x-goog-credential)=)[^&#\s\"']*", re.IGNORECASE)
_USERINFO = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/@\s\"']+@", re.IGNORECASE)
REDACTED = "***"


def redact_credentials(text: str) -> str:
    """Text with every URL's credentials replaced by ***: the user:password@ part (a dataset URL, a
    tracking URI) and secret query values (token=, sig=, X-Amz-Signature=, ...). Everything recorded
    (logs, source.json, MLflow params and tags, model cards, lineage) passes through this one rule."""
    return _SECRET_QUERY.sub(rf"\1{REDACTED}", _USERINFO.sub(rf"\1{REDACTED}@", text))


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
