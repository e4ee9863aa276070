"""blogqa: web pages in, trustworthy question/answer data out (Airflow 3 + Postgres/pgvector)."""

__version__ = "0.1.0"
