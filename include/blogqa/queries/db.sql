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

-- name: schema_version
SELECT coalesce(max(version), 0) FROM blogqa.schema_migrations

-- While set 1 is the only vector set with columns (no other set building or retired), it
-- follows BLOGQA_EMBED_MODEL: a new model there is re-embedded in place (`blogqa reprocess
-- --cause embeddings`), as before vector sets existed. Otherwise the model of each set is
-- fixed ("pinned"), and the settings must name the active one.
-- name: follow_configured_model
UPDATE blogqa.vector_sets SET embed_model = %s
WHERE id = 1 AND state = 'active' AND embed_model IS DISTINCT FROM %s
  AND NOT EXISTS (SELECT 1 FROM blogqa.vector_sets WHERE state IN ('building', 'retired'))

-- name: active_vector_set
SELECT id, embed_model, embed_dim,
       id > 1 OR EXISTS (SELECT 1 FROM blogqa.vector_sets
                         WHERE state IN ('building', 'retired')) AS pinned
FROM blogqa.vector_sets WHERE state = 'active'
