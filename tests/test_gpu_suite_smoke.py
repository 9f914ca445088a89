"""bench/gpu_check.py --suite realistic --tiny: the GPU suite's own code (model and tokenizer made
offline, stage rows through the train stage, bare loops, the table) runs on CPU, so a GPU session
does not spend its minutes on a typo. Two rows here; `--suite realistic --tiny` alone runs all of
them (about 10 minutes on 2 busy cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_realistic_suite_runs_on_cpu_with_a_tiny_model(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, str(REPO / "bench/gpu_check.py"), "--suite", "realistic", "--tiny",
                          "--rows", "lora+packing", "bare-lora-packed", "--steps", "3", "--warmup-steps", "1",
                          "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads((tmp_path / "out/suite.json").read_text())["rows"]
    assert set(rows) == {"lora+packing", "bare-lora-packed"}
    stage, bare = rows["lora+packing"], rows["bare-lora-packed"]
    assert stage["tokens_per_second"] > 0 and bare["tokens_per_second"] > 0 and stage["vs_bare"] > 0
    assert stage["attn_implementation"] == "sdpa" and stage["padding_share"] == 0.0
    assert "| lora+packing |" in (tmp_path / "out/suite.md").read_text()
