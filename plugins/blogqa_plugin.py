"""Airflow plugin: the blogqa results API inside Airflow's API server, under /blogqa.

Every route but /blogqa/health requires an authenticated Airflow user (Airflow's own
`get_user` security dependency: the UI session cookie or an `Authorization: Bearer` JWT).
Install the blogqa package in Airflow's environment and put this file in `plugins_folder`.
Nothing connects to the database until the first request.
"""

from __future__ import annotations

from typing import ClassVar

from airflow.plugins_manager import AirflowPlugin

from blogqa.api import create_app

app = create_app(airflow_auth=True)


class BlogqaPlugin(AirflowPlugin):
    name = "blogqa"
    fastapi_apps: ClassVar[list[dict]] = [
        {"app": app, "url_prefix": "/blogqa", "name": "blogqa results API"}
    ]
