-- The readiness checks of `blogqa init` (blogqa.checks): read-only.

-- name: server_version
SELECT current_setting('server_version')

-- name: pgvector_version
SELECT extversion FROM pg_extension WHERE extname = 'vector'

-- name: schema_present
SELECT to_regclass('blogqa.schema_migrations') IS NOT NULL
