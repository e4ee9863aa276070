-- The local runner (blogqa.runner). Run on Airflow's metadata database, not blogqa's.

-- The alembic revision Airflow's `db migrate` left, read without Airflow's ORM.
-- name: metadata_revision
SELECT version_num FROM alembic_version
