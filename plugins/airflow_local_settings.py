"""Airflow's local-settings hook (imported by every Airflow process at start; the plugins
folder is on its sys.path): blogqa preloads its pipeline in the scheduler and in Celery
workers, so the task processes they fork start with it imported (blogqa.preload).

A deployment with an airflow_local_settings.py of its own (in $AIRFLOW_HOME/config, which
comes first on sys.path) adds the two lines below to it instead.
"""

from blogqa.preload import preload

preload()
