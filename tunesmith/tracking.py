"""MLflow tracking that never costs a finished stage.

A stage collects its params, metrics (with steps), tags and artifacts in a StageRecord. When the
stage ends the record is written to results/{recipe}/tracking/<stage>.json first, then pushed to
MLflow in one go. If the tracking server is down the push warns and the record stays marked
unsynced; `tunesmith sync-mlflow results/<recipe>` pushes it later.

Under Snakemake the workflow's main process does the pushing (start_writer, from the Snakefile's
onstart): a stage only writes its record, and one writer thread pushes records as they appear.
Importing mlflow and opening its store cost a stage process about 4.5 s on 2 cores, more than most
data stages take to run; with one writer that cost is paid once per workflow, and SLURM jobs on
other nodes never write to a SQLite store themselves. Scripts run by hand push their own record.

Layout in MLflow: one experiment per recipe, one parent run per workflow invocation of that
recipe (found by the invocation tag, created by whichever stage comes first), one child run per
stage. Stages run in separate processes, maybe on separate nodes, so the link is the tag
`tunesmith.invocation` (set by the Snakefile in TUNESMITH_INVOCATION, inherited by jobs).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.provenance import redact_credentials

log = logging.getLogger("tunesmith.tracking")

ENV_URI = "TUNESMITH_TRACKING_URI"
ENV_ENABLED = "TUNESMITH_TRACKING"
ENV_TIMEOUT = "TUNESMITH_TRACKING_TIMEOUT"
ENV_INVOCATION = "TUNESMITH_INVOCATION"
# The invocation whose main process pushes the records (start_writer); empty: each stage pushes.
ENV_WRITER = "TUNESMITH_TRACKING_WRITER"
# The MLflow client's own credentials variables: the only place a password may come from.
ENV_USER, ENV_PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


def default_uri(workdir: str | Path = ".") -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def tracking_uri() -> str:
    uri = os.environ.get(ENV_URI)
    check_uri(uri, ENV_URI)  # set by hand in the environment, the config's check never saw it
    return uri or default_uri()


def new_invocation_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def invocation_id() -> str:
    return os.environ.setdefault(ENV_INVOCATION, new_invocation_id())


def configure_env(cfg: dict[str, Any], workdir: str | Path = ".") -> None:
    """Called by the Snakefile: put the tracking settings where every job (local or SLURM) sees them."""
    check_uri(cfg.get("uri"))
    os.environ[ENV_URI] = cfg.get("uri") or default_uri(workdir)
    os.environ[ENV_ENABLED] = "1" if cfg.get("enabled", True) else "0"
    os.environ[ENV_TIMEOUT] = str(cfg.get("timeout_s", 10))
    os.environ.setdefault(ENV_WRITER, "")  # declared in the Snakefile's envvars: it must exist
    invocation_id()


# ---------------------------------------------------------------- provenance


# ---------------------------------------------------------------- the record


# ---------------------------------------------------------------- pushing


def enabled() -> bool:
    return os.environ.get(ENV_ENABLED, "1") != "0"


def redact_uri(uri: str) -> str:
    """A URI without the credentials a user may have put in it."""
    return redact_credentials(uri)


def check_uri(uri: str | None, where: str = "tracking.uri") -> None:
    """The URI is written into every stage record and the parent run's tags: no password in it,
    wherever it comes from (where: config.yaml's tracking.uri, the environment, a CLI option)."""
    from urllib.parse import urlsplit

    if uri and urlsplit(uri).password:
        raise TunesmithError(f"{where} carries a password ({urlsplit(uri).hostname}): it would be written to every "
                             f"stage record. Drop it from the URI and set {ENV_USER} and {ENV_PASSWORD} in the "
                             f"environment instead")
