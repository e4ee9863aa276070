# syntax=docker/dockerfile:1
# blogqa on Airflow's official image, extended the way Airflow's docker-stack guide does it
# ("Extending the image"). Used by docker-compose.airflow.yml for every Airflow component,
# airflow-init and the optional blogqa-api service.
#
# The tag must equal the apache-airflow pin in requirements.txt (tests/test_compose.py
# checks it): requirements.txt is this project's constraints file, resolved for Python
# 3.11/3.12.
FROM apache/airflow:3.3.2-python3.11

# The base image ends as the airflow user, whose virtualenv (~/.local) holds Airflow; say so
# explicitly: everything below installs as that user, never as root.
USER airflow

# Every pinned package. apache-airflow is pinned to the image's own version on the same line,
# as Airflow's guide recommends, so this can never up- or downgrade Airflow (a mismatch with
# requirements.txt fails the build instead).
COPY --chown=airflow:root requirements.txt /tmp/blogqa-requirements.txt
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /tmp/blogqa-requirements.txt \
    && rm /tmp/blogqa-requirements.txt

# The blogqa package itself, non-editable (a wheel in site-packages, with its package data),
# without touching the pins above. The build context (.dockerignore keeps it to the sources)
# is bind-mounted, not copied into a layer, and built in a scratch directory the airflow user
# owns: setuptools writes build/ and *.egg-info next to the sources, and the package's
# relative symlinks to dags/ and plugins/ resolve there. setuptools comes from the pins (no
# build isolation, no download).
RUN --mount=type=bind,source=.,target=/tmp/blogqa-context \
    src="$(mktemp -d)" \
    && cp -r /tmp/blogqa-context/. "$src"/ \
    && pip install --no-cache-dir --no-deps --no-build-isolation "$src" \
    && rm -rf "$src"

# The image carries the DAG and the plugin; the compose file mounts neither.
COPY --chown=airflow:root dags/ /opt/airflow/dags/
COPY --chown=airflow:root plugins/ /opt/airflow/plugins/

# Fail the build, not the first task, when the installed package lost its migrations, the
# DAG does not parse (a DagBag parse needs no database) or the plugin's app cannot be built
# (the plugin builds it on the first request: `.app` builds it now).
RUN python -c "from blogqa import db; assert db.migration_files(), 'blogqa has no migrations'" \
    && python -c "from airflow.dag_processing.dagbag import DagBag; \
b = DagBag('/opt/airflow/dags'); \
assert not b.import_errors and 'blogqa_pipeline' in b.dag_ids, b.import_errors" \
    && python -c "import runpy; runpy.run_path('/opt/airflow/plugins/blogqa_plugin.py')['app'].app"
