"""`make airflow` (`blogqa airflow`): a local Airflow on the embedded database from one command,
which prints the UI address and login and stops everything on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import httpx
import psutil
import pytest

from blogqa import airflow_cli, local_airflow

pytestmark = pytest.mark.timeout(600)


def test_blogqa_airflow_serves_the_ui_and_stops_everything_on_ctrl_c(tmp_path):
    port = local_airflow.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "BLOGQA_"))}
    env["BLOGQA_HOME"] = str(tmp_path / "home")
    env["BLOGQA_SCHEDULE"] = "none"  # no nightly run catching up while the test looks
    command = subprocess.Popen(
        [airflow_cli.executable("blogqa"), "airflow", "--port", str(port)],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
    )
    try:
        said = ""
        deadline = time.monotonic() + 300
        while "Ctrl-C" not in said:
            assert command.poll() is None and time.monotonic() < deadline, said
            said += command.stderr.readline()
        said = " ".join(said.split())  # the console wraps long lines
        assert f"http://127.0.0.1:{port}" in said
        password = re.search(r"login admin / (\S+)\)", said).group(1)
        components = psutil.Process(command.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in components)
        for component in ("api_server", "scheduler", "dag-processor", "triggerer"):
            assert f"airflow {component}" in names, names  # api-server retitles itself

        base = f"http://127.0.0.1:{port}"
        token = httpx.post(
            f"{base}/auth/token", json={"username": "admin", "password": password}, timeout=30
        )
        assert token.status_code in (200, 201), token.text
        jwt = {"Authorization": f"Bearer {token.json()['access_token']}"}
        assert httpx.get(f"{base}/api/v2/dags/blogqa_pipeline", headers=jwt).status_code in (
            200,
            404,  # the dag-processor may not have stored it yet
        )
        health = httpx.get(f"{base}/blogqa/health", timeout=30)
        assert health.status_code == 200 and health.json()["schema_status"] == "ready"
    finally:
        command.send_signal(signal.SIGINT)
        try:
            code = command.wait(timeout=90)
        except subprocess.TimeoutExpired:
            _kill_tree(command.pid)  # a failed test leaves no Airflow running on the machine
            raise
    assert code == 0
    _gone, alive = psutil.wait_procs(components, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    status = subprocess.run(
        [airflow_cli.executable("blogqa"), "db", "status"],
        env=env,
        capture_output=True,
        check=False,
    )
    assert status.returncode == 3  # the embedded database it started is stopped too


def _kill_tree(pid: int) -> None:
    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
