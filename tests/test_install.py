"""`tunesmith validate` from a wheel installed into a fresh venv outside the repository: the schemas
ship inside the package, and the package's own dependencies are enough to check a recipe."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    # No PYTHONPATH: the venv must find tunesmith in its own site-packages, never in the checkout.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(venv, work dir): the repository's wheel installed into a bare venv in a temporary directory."""
    root = tmp_path_factory.mktemp("install")
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    src = root / "src"
    src.mkdir()
    shutil.copy2(REPO / "pyproject.toml", src)
    shutil.copytree(REPO / "tunesmith", src / "tunesmith", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = root / "wheels"
    proc = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, src],
                cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = wheels.glob("tunesmith-*.whl")

    venv = root / "venv"
    proc = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    assert proc.returncode == 0, proc.stderr
    # This interpreter's pip installs into the new venv (pip --python): the venv needs no pip of its own.
    # Dependencies (jsonschema, pyyaml) resolve from the package index.
    proc = _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", wheel], cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    work = root / "work"
    work.mkdir()
    return venv, work


@pytest.mark.slow
def test_wheel_ships_the_schemas_and_validates_a_recipe(installed):
    venv, work = installed
    proc = _run([venv / "bin" / "python", "-c", "import tunesmith.recipe as r; print(r.__file__)"], cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_relative_to(venv), proc.stdout  # the installed copy, not the checkout

    recipe = REPO / "recipes" / "demo-reverse-lora.yaml"
    proc = _run([venv / "bin" / "tunesmith", "validate", recipe], cwd=work)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "OK" in out and "demo-reverse-lora.yaml" in out


@pytest.mark.slow
def test_wheel_validate_names_a_typo_with_a_suggestion(installed):
    venv, work = installed
    bad = work / "typo.yaml"
    bad.write_text("dataset:\n  source: data.jsonl\nfilter:\n  max_tokenz: 5\n")
    proc = _run([venv / "bin" / "tunesmith", "validate", bad], cwd=work)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "filter.max_tokenz" in out and "did you mean 'max_tokens'" in out


@pytest.mark.slow
def test_the_cuda_environment_resolves_with_unsloth():
    """requirements-cuda.txt resolves as one set, unsloth included, from the package index: a broken
    pin is caught here, without a GPU (no wheel is installed; pip reads metadata only)."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                               "--report", str(report), "-r", str(REPO / "requirements-cuda.txt")],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        names = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                 for i in json.loads(report.read_text())["install"]}
    for name in ("unsloth", "unsloth-zoo", "bitsandbytes", "liger-kernel", "transformers", "trl", "datasets",
                 "lm-eval", "sentence-transformers", "mlflow", "snakemake", "torch"):
        assert name in names, name
    from packaging.version import Version

    assert Version(names["transformers"]) <= Version("5.17.0") and Version(names["trl"]) <= Version("1.15.0")
    assert Version(names["datasets"]) < Version("5")
