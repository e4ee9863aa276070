"""Airflow's command line, run as a subprocess.

blogqa changes Airflow's state (the `blogqa_llm` pool) through `airflow ...` commands rather
than Airflow's ORM models: the CLI is a public, versioned interface, the models are not. The
subprocess inherits this process's environment, so it talks to the same metadata database
(`runner.configure_airflow` fills that in before).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from blogqa.errors import BlogqaError

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 120.0  # an `airflow` command takes seconds (imports); minutes means stuck


class AirflowCLIError(BlogqaError):
    """An `airflow` command could not run or failed; the message has its output's tail."""


def executable(name: str = "airflow") -> str:
    """A console script (`airflow`, `blogqa`, `celery`) of this interpreter's environment (the
    Airflow blogqa imports, whatever PATH says), else the one on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise AirflowCLIError(
            f"the `{name}` command is neither next to {sys.executable} nor on PATH: install"
            " it in this environment"
        )
    return found


def run(*args: str, timeout: float = TIMEOUT_SECONDS, env: dict[str, str] | None = None) -> str:
    """Run `airflow ARGS` with `env` (default: this process's environment); its output."""
    shown = shlex.join(["airflow", *args])
    command = [executable(), *args]
    log.info("running %s", shown)
    try:
        result = subprocess.run(
            command,
            env=dict(os.environ) if env is None else env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AirflowCLIError(
            f"`{shown}` did not finish within {timeout:.0f} s: check that Airflow's metadata"
            " database answers (AIRFLOW__DATABASE__SQL_ALCHEMY_CONN)"
        ) from None
    except OSError as exc:
        raise AirflowCLIError(f"could not run {command[0]}: {exc}") from exc
    if result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip()).splitlines()
        tail = "\n".join(output[-5:]) or "no output"
        raise AirflowCLIError(f"`{shown}` failed (exit {result.returncode}):\n{tail}")
    return result.stdout


def set_pool(name: str, slots: int, description: str) -> None:
    """Create the pool, or set its slots and description (`airflow pools set`: idempotent)."""
    run("pools", "set", name, str(slots), description)
