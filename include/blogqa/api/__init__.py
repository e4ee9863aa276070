"""The read-only results API (FastAPI): `blogqa serve`, or mounted in Airflow by the plugin."""

from blogqa.api.app import create_app

__all__ = ["create_app"]
