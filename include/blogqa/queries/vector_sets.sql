-- Embedding vector sets (blogqa.vector_sets; migration 013 describes the states).
--
-- Column, index and constraint names depend on the set, so the blocks with {braces} are
-- templates: blogqa.vector_sets fills them with psycopg.sql identifiers (never with values,
-- which stay bind parameters).

-- name: list_sets
SELECT id, embed_model, embed_dim, state, created_at, built_at, switched_at, dropped_at
FROM blogqa.vector_sets ORDER BY id

-- Ids are never reused (a dropped set keeps its row): an id names its set's columns.
-- name: insert_set
INSERT INTO blogqa.vector_sets (id, embed_model, embed_dim, state)
SELECT coalesce(max(id), 0) + 1, %s, %s, 'building' FROM blogqa.vector_sets
RETURNING id

-- name: mark_built
UPDATE blogqa.vector_sets SET built_at = now() WHERE id = %s

-- Two statements: the one-active unique index is checked row by row.
-- name: retire_set
UPDATE blogqa.vector_sets SET state = 'retired' WHERE id = %s

-- name: activate_set
UPDATE blogqa.vector_sets SET state = 'active', switched_at = now() WHERE id = %s

-- The dimension the start-up check compares BLOGQA_EMBED_DIM with (migration 002).
-- name: record_dim
UPDATE blogqa.settings SET value = %s WHERE key = 'embed_dim'

-- name: mark_dropped
UPDATE blogqa.vector_sets SET state = 'dropped', dropped_at = now() WHERE id = %s

-- Writers (the pipeline's loads) wait while a switch runs; readers (the API) go on until
-- the renames, which take a moment.
-- name: lock_outputs
LOCK TABLE blogqa.summaries, blogqa.questions, blogqa.chunks IN SHARE ROW EXCLUSIVE MODE

-- For the switch's transaction only (is_local = true): a long reader holding the tables
-- makes the switch fail after this long instead of queueing every reader behind it.
-- name: lock_timeout
SELECT set_config('lock_timeout', %s, true)

-- name: count_missing
SELECT count(*) FILTER (WHERE {vec} IS NULL), count(*) FROM blogqa.{table}

-- Rows without a vector in the set, with their text and the URL (and queue row) the
-- embedding request's usage is charged to.
-- name: missing_summaries
SELECT s.document_id, s.summary, d.url, q.id
FROM blogqa.summaries s JOIN blogqa.documents d ON d.id = s.document_id
LEFT JOIN blogqa.url_queue q ON q.url = d.url
WHERE s.{vec} IS NULL ORDER BY s.document_id LIMIT %s

-- name: missing_questions
SELECT x.id, x.question, d.url, q.id
FROM blogqa.questions x JOIN blogqa.documents d ON d.id = x.document_id
LEFT JOIN blogqa.url_queue q ON q.url = d.url
WHERE x.{vec} IS NULL ORDER BY x.id LIMIT %s

-- name: missing_chunks
SELECT c.id, c.text, d.url, q.id
FROM blogqa.chunks c JOIN blogqa.documents d ON d.id = c.document_id
LEFT JOIN blogqa.url_queue q ON q.url = d.url
WHERE c.{vec} IS NULL ORDER BY c.id LIMIT %s

-- A summary is keyed by its document, whose reload deletes and re-inserts it: the text
-- must still be the one embedded. Question and chunk ids are never reused.
-- name: save_summaries
UPDATE blogqa.summaries s SET {vec} = v.embedding, {model} = %s
FROM unnest(%s::bigint[], %s::text[], %s::vector[]) AS v(id, text, embedding)
WHERE s.document_id = v.id AND s.summary = v.text AND s.{vec} IS NULL

-- name: save_questions
UPDATE blogqa.questions x SET {vec} = v.embedding
FROM unnest(%s::bigint[], %s::text[], %s::vector[]) AS v(id, text, embedding)
WHERE x.id = v.id AND x.{vec} IS NULL

-- name: save_chunks
UPDATE blogqa.chunks c SET {vec} = v.embedding
FROM unnest(%s::bigint[], %s::text[], %s::vector[]) AS v(id, text, embedding)
WHERE c.id = v.id AND c.{vec} IS NULL

-- name: add_vector_column
ALTER TABLE blogqa.{table} ADD COLUMN {vec} vector({dim})

-- name: add_model_column
ALTER TABLE blogqa.summaries ADD COLUMN {model} text

-- Outside a transaction: readers and the pipeline's loads go on while it is built.
-- name: create_index
CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} ON blogqa.{table} USING hnsw ({vec} vector_cosine_ops)

-- A concurrent build that failed leaves an invalid index behind, which IF NOT EXISTS would
-- keep: the build drops it and starts again.
-- name: index_valid
SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'blogqa' AND c.relname = %s

-- name: drop_index
DROP INDEX CONCURRENTLY IF EXISTS blogqa.{index}

-- name: rename_column
ALTER TABLE blogqa.{table} RENAME COLUMN {old} TO {new}

-- name: rename_index
ALTER INDEX blogqa.{old} RENAME TO {new}

-- name: drop_not_null
ALTER TABLE blogqa.{table} ALTER COLUMN {column} DROP NOT NULL

-- name: drop_check
ALTER TABLE blogqa.{table} DROP CONSTRAINT IF EXISTS {constraint}

-- NOT VALID: no scan under the switch's lock; rows written from now on are checked, and
-- validate_check (after the switch commits, taking no lock that blocks readers or
-- writers) proves the rows already there.
-- name: add_check
ALTER TABLE blogqa.{table} ADD CONSTRAINT {constraint} CHECK ({condition}) NOT VALID

-- name: validate_check
ALTER TABLE blogqa.{table} VALIDATE CONSTRAINT {constraint}

-- name: drop_column
ALTER TABLE blogqa.{table} DROP COLUMN IF EXISTS {column}

-- The views reading the active set's columns (blogqa's own and any a SQL user made). A view
-- is bound to columns, not to their names, so after a switch's renames it would still read
-- the retired set: the switch takes their definitions first and re-creates them after.
-- name: dependent_views
SELECT DISTINCT n.nspname, v.relname, pg_get_viewdef(v.oid)
FROM pg_depend dep
JOIN pg_rewrite r ON r.oid = dep.objid
JOIN pg_class v ON v.oid = r.ev_class
JOIN pg_namespace n ON n.oid = v.relnamespace
JOIN pg_attribute a ON a.attrelid = dep.refobjid AND a.attnum = dep.refobjsubid
WHERE dep.classid = 'pg_rewrite'::regclass
  AND dep.refobjid = ANY(%s::regclass[]) AND a.attname = ANY(%s) AND v.oid <> dep.refobjid

-- name: replace_view
CREATE OR REPLACE VIEW {view} AS {definition}

-- One build of a set at a time (two would pay for the same vectors): a session lock on
-- (blogqa.vector_sets.BUILD_LOCK, the set's id), released when the build ends.
-- name: try_build_lock
SELECT pg_try_advisory_lock(%s, %s)

-- name: build_unlock
SELECT pg_advisory_unlock(%s, %s)
