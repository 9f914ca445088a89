"""tools/wheelhouse.py's own logic, fast and offline: the image's `pip freeze` read and left out
(with the dependencies only it needs), the lock file read back, the target's platform tags. The
10-minute build itself is run by hand (docs/offline-install.md gives the figures)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("wheelhouse", REPO / "tools" / "wheelhouse.py")
wh = importlib.util.module_from_spec(_spec)
sys.modules["wheelhouse"] = wh  # dataclasses look their module up by name
_spec.loader.exec_module(wh)

FREEZE = """\
# an image
torch==2.11.0+cu130
nvidia-cublas==13.1.0.3
Transformers==5.17.0
peft==0.21.0
numpy==2.4.6
-e git+https://example.invalid/x.git#egg=x
flash_attn @ file:///wheels/flash_attn-2.8.3-cp312-linux_x86_64.whl
"""


def test_freeze_is_read_with_names_canonical_and_urls_kept():
    image = wh.parse_freeze(FREEZE)
    assert image["torch"].version == "2.11.0+cu130"
    assert image["transformers"].version == "5.17.0"  # case and separators as pip compares them
    assert image["flash-attn"].version is None          # a `name @ url` line: provided, version unknown
    assert "x" not in image                             # editable lines are not provided packages


def test_freeze_line_that_is_not_a_pin_is_named():
    with pytest.raises(wh.WheelhouseError, match=r"image.txt, line 2: 'torch>=2' is not"):
        wh.parse_freeze("numpy==2.0\ntorch>=2\n", "image.txt")


def test_plan_leaves_out_what_the_image_meets_and_downloads_what_it_does_not():
    image = wh.parse_freeze(FREEZE)
    reqs = [wh.Requirement(r) for r in ("torch==2.11.0", "transformers==5.17.0", "peft==0.21.2", "trl==1.15.0")]
    p = wh.plan(reqs, image)
    # 2.11.0+cu130 satisfies ==2.11.0 (a local label); the index is asked for the public version
    assert "torch==2.11.0" in p.requirements and "torch" in p.provided
    assert "transformers" in p.provided
    # peft 0.21.0 does not satisfy ==0.21.2: downloaded, and said so
    assert "peft==0.21.2" in p.requirements and "peft" not in p.provided
    assert any(n.startswith("peft: the image has 0.21.0") for n in p.notes)
    # the image's other packages constrain the resolution to their versions
    assert "numpy==2.4.6" in p.constraints and "nvidia-cublas==13.1.0.3" in p.constraints
    kept = wh.plan(reqs, image, keep_image_versions=True)
    assert "peft==0.21.0" in kept.requirements and "peft" in kept.provided


def _item(name, version, requires=(), requested=False, extras=()):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)},
            "download_info": {"url": f"https://files.invalid/{name}-{version}.whl"},
            "requested": requested, "requested_extras": list(extras)}


def test_dependencies_only_the_image_needs_are_left_out():
    report = {"install": [
        _item("torch", "2.11.0", ["nvidia-cublas==13.1.0.3; platform_system == 'Linux'", "filelock", "sympy"],
              requested=True),
        _item("nvidia-cublas", "13.1.0.3"),
        _item("sympy", "1.14.0", ["mpmath<1.4"]),
        _item("mpmath", "1.3.0"),
        _item("filelock", "3.20.0"),
        _item("trl", "1.15.0", ["torch>=2", "datasets>=3", "rich; extra == 'cli'"], requested=True),
        _item("datasets", "4.8.5", ["filelock", "dill<0.4.2", "pandas; python_version < '3.0'"]),
        _item("dill", "0.4.1"),
        _item("rich", "14.0.0"),
        _item("mlflow", "3.17.2", ["flask<4; extra == 'auth'"], requested=True, extras=["auth"]),
        _item("flask", "3.1.3"),
    ]}
    resolved = wh.read_report(report)
    target = wh.Target("3.12", "manylinux_2_28_x86_64")
    keep = wh.needed(resolved, {"torch", "nvidia-cublas"}, target.markers())
    # torch's own dependencies go with it; filelock stays (datasets needs it too)
    assert keep == {"trl", "datasets", "dill", "filelock", "mlflow", "flask"}
    assert "rich" not in keep  # trl[cli] was not asked for
    assert "flask" in keep     # mlflow[auth] was


def test_lock_round_trip_and_bad_lines(tmp_path):
    path = tmp_path / "requirements.lock"
    wh.write_lock(path, {"trl": "1.15.0", "torch": "2.13.0+cpu"}, ["header"],
                  {"peft": wh.Provided("peft", "0.21.0")})
    text = path.read_text()
    assert wh.parse_lock(text) == {"torch": "2.13.0+cpu", "trl": "1.15.0"}
    assert "#   peft==0.21.0" in text  # what the image provides is recorded, not installed
    with pytest.raises(wh.WheelhouseError, match=r"requirements.lock, line 2: 'trl>=1' is not an exact pin"):
        wh.parse_lock("torch==2.13.0\ntrl>=1\n")
    with pytest.raises(wh.WheelhouseError, match="pinned twice"):
        wh.parse_lock("Torch==2.13.0\ntorch==2.13.0\n")


def test_manylinux_target_accepts_every_older_manylinux():
    tags = wh.platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags
    assert wh.platform_tags("macosx_14_0_arm64") == ["macosx_14_0_arm64"]
    args = wh.Target("3.12", "manylinux_2_28_x86_64").pip_args()
    assert args[:1] == ["--only-binary=:all:"] and "cp312" in args
    assert wh.Target().pip_args() == []


def test_the_committed_requirements_files_parse():
    for name in ("requirements.txt", "requirements-cuda.txt"):
        names = {wh.canonicalize_name(r.name) for r in wh.read_requirements(REPO / name)}
        assert {"torch", "transformers", "snakemake", "mlflow"} <= names, name
