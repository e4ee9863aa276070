"""Airflow plugin: the blogqa results API and the operators' view inside Airflow's API server.

- `fastapi_apps`: the API under /blogqa (/blogqa/api/v1/..., /blogqa/metrics, /blogqa/ui).
  Airflow does not authenticate a plugin's app, so the app does: every route but
  /blogqa/health requires an Airflow user with read access to the DAG blogqa_pipeline, asked
  of the configured auth manager (the UI session cookie or an `Authorization: Bearer` JWT).
- `external_views` (Airflow 3.1+): a "blogqa" entry in the navigation and a "blogqa" tab on
  the DAG, both showing /blogqa/ui (queue by status and age, recent runs, dead URLs with
  reasons, model calls/tokens/cost per day and model, quality results) in the UI's iframe.

Install the blogqa package in Airflow's environment and put this file in `plugins_folder`.
Nothing connects to the database until the first request, and nothing of the app is imported
before it either: Airflow imports this module in every task process too (`blogqa.asgi`).
"""

from __future__ import annotations

from typing import ClassVar

from airflow.plugins_manager import AirflowPlugin

from blogqa.asgi import LazyApp

PREFIX = "/blogqa"
app = LazyApp("blogqa.api:create_app", airflow_auth=True)


class BlogqaPlugin(AirflowPlugin):
    name = "blogqa"
    fastapi_apps: ClassVar[list[dict]] = [
        {"app": app, "url_prefix": PREFIX, "name": "blogqa results API"}
    ]
    external_views: ClassVar[list[dict]] = [
        {
            "name": "blogqa",
            "href": f"{PREFIX}/ui",
            "destination": "nav",
            "url_route": "blogqa",
            "category": "browse",
        },
        {
            "name": "blogqa",
            "href": f"{PREFIX}/ui?dag_id={{DAG_ID}}",
            "destination": "dag",
            "url_route": "blogqa-dag",
            # newer Airflow versions show the tab on this DAG only; 3.3 ignores the key
            "applies_to": {"dag.dag_id": ["blogqa_pipeline"]},
        },
    ]
