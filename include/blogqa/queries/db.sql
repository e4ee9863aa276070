-- The migration runner's bookkeeping and the schema checks (blogqa.db). The migrations
-- themselves are the numbered files of sql/; these statements only record which ran.

-- On the server's maintenance database: whether the named database exists.
-- name: database_exists
SELECT 1 FROM pg_database WHERE datname = %s

-- Held until the migrating transaction ends: one process migrates at a time.
-- name: migration_lock
SELECT pg_advisory_xact_lock(%s)

-- name: create_schema
CREATE SCHEMA IF NOT EXISTS blogqa

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS blogqa.schema_migrations (
    version integer PRIMARY KEY, name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now())

-- name: applied_versions
SELECT version FROM blogqa.schema_migrations

-- name: record_migration
INSERT INTO blogqa.schema_migrations (version, name) VALUES (%s, %s)

-- The embedding dimension the vector columns were created with (set by 002_outputs.sql).
-- name: embed_dim
SELECT value FROM blogqa.settings WHERE key = 'embed_dim'

-- name: schema_version
SELECT coalesce(max(version), 0) FROM blogqa.schema_migrations
