"""A non-editable install (a wheel, as the Dockerfile puts blogqa into Airflow's image) carries
the migrations, the named queries, the DAG file and the plugin: nothing is found through the
source checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

from tests.conftest import PROJECT_ROOT

CHECK = textwrap.dedent(
    """
    import os, sys
    import blogqa
    from blogqa import db, local_airflow, runner
    assert blogqa.__file__.startswith(sys.argv[1]), blogqa.__file__
    assert [v for v, _, _ in db.migration_files()] == list(range(1, len(db.migration_files()) + 1))
    assert "CREATE TABLE blogqa.url_queue" in db.migration_files()[0][2].read_text()
    from blogqa import queue
    from blogqa.api import queries
    assert queue.SQL.path == "queries/queue.sql" and "FOR UPDATE SKIP LOCKED" in queue.SQL.claim
    assert "d.url = %(value)s" in queries.SQL.document_by_url
    plugin = local_airflow.PLUGINS_FOLDER / "blogqa_plugin.py"
    assert plugin.is_file() and str(plugin).startswith(sys.argv[1])
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag(str(runner.DAGS_FOLDER))
    assert str(runner.DAGS_FOLDER).startswith(sys.argv[1])
    assert bag.import_errors == {} and "blogqa_pipeline" in bag.dag_ids, bag.import_errors
    print("ok", len(db.migration_files()))
    """
)


def test_a_wheel_carries_migrations_dag_and_plugin(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(
        PROJECT_ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", ".blogqa", "build", "*.egg-info", "__pycache__", "bench", "tests"
        ),
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "wheel", source],
        check=True,
        capture_output=True,
    )
    [wheel] = (tmp_path / "wheel").glob("blogqa-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)
    shutil.rmtree(source)  # nothing may come from a checkout

    result = subprocess.run(
        [sys.executable, "-c", CHECK, str(site)],
        env={
            "PYTHONPATH": str(site),
            "AIRFLOW_HOME": str(tmp_path / "airflow"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "PATH": "",
        },
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("ok ")
