"""The SLURM profile on a real single-node SLURM (tests/slurm/cluster.sh): the data stages of
tests/recipes/tiny-sweep.yaml, then one train job, each submitted with sbatch by
snakemake-executor-plugin-slurm through tests/slurm/profile.

Checks: every job Snakemake ran has a SLURM job id in its log, and slurmctld knows each id as a
COMPLETED job; the train job's sbatch call asks for `--gpus=1` on the gpu partition, and SLURM
allocated it gres/gpu:1. Daemons are stopped (by PID) in the fixture's teardown.

    .venv/bin/pytest -m slurm tests/test_slurm.py        (root; installs slurm-wlm + munge if missing)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from workflow_helpers import REPO, make_workdir, write_config

pytestmark = pytest.mark.slurm

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
PROFILE = REPO / "tests" / "slurm" / "profile"
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
RECIPE = "tiny-sweep"
from tunesmith.pipeline import DATA_STAGES  # noqa: E402
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")


def _slurm_env() -> dict[str, str]:
    """The environment less the SLURM_CONF=/dev/null that conftest.py sets for every other test."""
    return {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}


def _can_run_slurm() -> str | None:
    if shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged"):
        return None if os.geteuid() == 0 else "slurm is installed but the daemons need root"
    if os.geteuid() != 0:
        return "needs root to install and start slurm-wlm and munge"
    if not shutil.which("apt-get"):
        return "slurm-wlm is not installed and apt-get is not available"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _can_run_slurm()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm-state")
    env = {**_slurm_env(), "TUNESMITH_SLURM_STATE": str(state)}
    start = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=600)
    if start.returncode != 0:
        subprocess.run(["bash", str(CLUSTER), "stop"], env=env, timeout=120)
        pytest.fail(f"cluster.sh start failed:\n{start.stdout}\n{start.stderr}")
    yield state
    subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, timeout=120)


def _run(work: Path, config: Path, *targets: str, timeout: int, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """snakemake --workflow-profile tests/slurm/profile, in its own process group so a hung
    plugin (it ignores SIGTERM when status queries fail) is killed with everything it started."""
    env = {**_slurm_env(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("TUNESMITH_INVOCATION", None)
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(config), "--workflow-profile", str(PROFILE), "--verbose", *targets, *extra]
    # (extra last: --set-threads takes any number of values and would swallow a target after it)
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        subprocess.run(["scancel", "--user=root"], capture_output=True, env=_slurm_env())
        pytest.fail(f"snakemake on SLURM ran past {timeout} s:\n{out[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _job_rules(out: str) -> dict[str, str]:
    """snakemake jobid -> rule name, from the `rule X:` / `jobid: N` blocks of its log."""
    rules, current = {}, None
    for line in out.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line.strip())
        if m:
            current = m.group(1)
        m = re.match(r"^jobid: (\d+)", line.strip())
        if m and current:
            rules[m.group(1)] = current
            current = None
    return rules


def _sbatch_calls(out: str) -> dict[str, str]:
    """rule name -> sbatch call line (the plugin logs it at --verbose)."""
    calls = {}
    for line in out.splitlines():
        if line.startswith("sbatch call:"):
            m = re.search(r"--comment '?rule_(\w+?)_wildcards", line) or re.search(r"--comment '?rule_(\w+)", line)
            if m:
                calls[m.group(1)] = line
    return calls


def _scontrol(slurm_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", slurm_id], capture_output=True, text=True, timeout=30,
                          env=_slurm_env()).stdout


def _assert_all_slurm(out: str, expected_rules: set[str], workdir: Path) -> dict[str, str]:
    submitted = dict(SUBMITTED.findall(out))
    rules = _job_rules(out)
    ran = {jobid: rules.get(jobid, "?") for jobid in rules if rules[jobid] != "all"}
    assert set(ran) <= set(submitted), f"jobs without a SLURM job id: {set(ran) - set(submitted)}\n{out[-4000:]}"
    assert expected_rules <= set(ran.values()), f"rules run: {sorted(set(ran.values()))}"
    by_rule = {}
    for jobid, slurm_id in submitted.items():
        rule = ran.get(jobid, "?")
        # the plugin's per-job SLURM log (slurm-keep-successful-logs) and slurmctld's own record
        logs = list((workdir / ".snakemake" / "slurm_logs").glob(f"rule_{rule}/**/{slurm_id}.log"))
        assert logs, f"no SLURM log for job {slurm_id} ({rule})"
        info = _scontrol(slurm_id)
        assert "JobState=COMPLETED" in info, f"SLURM job {slurm_id} ({rule}):\n{info}"
        by_rule[rule] = slurm_id
    print("SLURM job ids:", by_rule)
    return by_rule


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm-work")
    work = make_workdir(tmp)
    config = write_config(work, {
        "recipes": [RECIPE],
        "recipes_dir": str(REPO / "tests" / "recipes"),
        "tracking": {"enabled": False},
        # gpus: 1 as a GPU site would set it (LoRA alone asks for none); on this CPU-only node the
        # train script still picks the CPU from what torch can see.
        "overrides": {RECIPE: {"dataset": {"source": str(REPO / "tests" / "data" / "tiny_reverse.jsonl")},
                               "train": {"gpus": 1}}},
    })
    return work, config


def test_data_stages_run_as_slurm_jobs(cluster, work):
    workdir, config = work
    started = time.time()
    proc = _run(workdir, config, f"results/{RECIPE}/data/train.jsonl", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-8000:]
    by_rule = _assert_all_slurm(proc.stdout, set(DATA_STAGES), workdir)
    for rule in DATA_STAGES:
        assert "-p cpu" in _sbatch_calls(proc.stdout)[rule]
    print(f"data stages on SLURM in {time.time() - started:.0f} s")
    assert (workdir / "results" / RECIPE / "data" / "train.jsonl").stat().st_size > 0
    assert by_rule


def test_train_job_asks_for_a_gpu(cluster, work):
    workdir, config = work
    target = f"results/{RECIPE}/r-8/train/metrics.json"
    proc = _run(workdir, config, target, timeout=1500)
    calls = _sbatch_calls(proc.stdout)
    assert "train" in calls, proc.stdout[-6000:]
    assert "--gpus=1" in calls["train"] and "-p gpu" in calls["train"], calls["train"]
    assert proc.returncode == 0, proc.stdout[-8000:]
    by_rule = _assert_all_slurm(proc.stdout, {"train"}, workdir)
    info = _scontrol(by_rule["train"])
    assert "Partition=gpu" in info
    assert re.search(r"gres/gpu[:=]1|gpu:1", info), info


def test_train_job_runs_two_data_parallel_tasks_through_srun(cluster, work):
    """train.processes: 2 on CPU: the sbatch call asks for 2 tasks; inside the job srun starts one
    accelerate launcher on the node, which reads its machine rank and the main address from SLURM's
    environment and runs 2 ranks (gloo). One thread per task: the loopback node has 2 CPUs."""
    workdir, config = work
    ddp = workdir / "config-ddp.yaml"
    data = yaml.safe_load(config.read_text())
    data["overrides"][RECIPE]["train"] = {"gpus": 0, "processes": 2}  # train only: the data stages stay done
    ddp.write_text(yaml.safe_dump(data, sort_keys=False))
    target = f"results/{RECIPE}/r-16/train/metrics.json"
    started = time.time()
    proc = _run(workdir, ddp, target, timeout=1500, extra=("--set-threads", "train=1"))
    calls = _sbatch_calls(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-8000:]
    assert "--ntasks=2" in calls["train"] and "--cpus-per-task=1" in calls["train"], calls["train"]
    by_rule = _assert_all_slurm(proc.stdout, {"train"}, workdir)
    assert "NumTasks=2" in _scontrol(by_rule["train"])
    metrics = json.loads((workdir / target).read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2
    log = (workdir / "logs" / RECIPE / "r-16" / "train.log").read_text()
    assert "srun --nodes=1 --ntasks-per-node=1 --cpus-per-task=2" in log, log[-3000:]
    print(f"2-task training job on SLURM in {time.time() - started:.0f} s")
