-- Work in progress between stages (blogqa.work_items) and the final load into the output
-- tables (blogqa.store). Every write after the claim is fenced by the lease token.

-- What the output tables already hold for some URLs: decides conditional GET and reuse.
-- name: stored
SELECT d.id, d.url, d.canonical_url, d.title, d.author, d.published, d.site_name, d.language,
       d.text, d.content_hash, d.etag, d.last_modified, s.model, s.prompt_version, s.embed_model
FROM blogqa.documents d LEFT JOIN blogqa.summaries s ON s.document_id = d.id
WHERE d.url = ANY(%s)

-- A crawled page, replacing an older lease's leftovers (run only for rows lock_held kept).
-- name: save_pages
INSERT INTO blogqa.work_items (queue_id, lease_token, page, unchanged)
VALUES (%s, %s, %s, %s)
ON CONFLICT (queue_id) DO UPDATE SET lease_token = EXCLUDED.lease_token,
    page = EXCLUDED.page, unchanged = EXCLUDED.unchanged, llm_result = NULL,
    chunks = NULL, vectors = NULL, updated_at = now()

-- The work_items row is written only while its lease is still held: the row carries the
-- lease's token (an older lease's leftovers are not overwritten) and the queue row is still
-- processing under that token (a cancel, or an expired lease the claim took back, clears it).
-- name: save_llm_results
UPDATE blogqa.work_items w SET llm_result = v.result, updated_at = now()
FROM unnest(%s::bigint[], %s::uuid[], %s::jsonb[]) AS v(id, token, result)
JOIN blogqa.url_queue q ON q.id = v.id AND q.lease_token = v.token AND q.status = 'processing'
WHERE w.queue_id = v.id AND w.lease_token = v.token
RETURNING w.queue_id

-- Fenced as save_llm_results. The vectors go in binary (%b): psycopg's text form of a bytea[]
-- takes 0.15 CPU s for 125 documents of 6 vectors of 1536 dimensions, binary 0.02 s.
-- name: save_vectors
UPDATE blogqa.work_items w SET chunks = v.chunks, vectors = v.vectors, updated_at = now()
FROM unnest(%s::bigint[], %s::uuid[], %s::jsonb[], %b::bytea[]) AS v(id, token, chunks, vectors)
JOIN blogqa.url_queue q ON q.id = v.id AND q.lease_token = v.token AND q.status = 'processing'
WHERE w.queue_id = v.id AND w.lease_token = v.token
RETURNING w.queue_id

-- Work rows written under the leases given (ids and tokens); an older lease's are ignored.
-- name: work_items
SELECT w.queue_id, w.page, w.unchanged, w.llm_result, w.chunks, w.vectors
FROM blogqa.work_items w JOIN unnest(%s::bigint[], %s::uuid[]) AS l(id, token)
ON w.queue_id = l.id AND w.lease_token = l.token

-- One model call of the API's ask (no request id). blogqa.api.answers repeats the VALUES
-- row to write a request's calls in one statement.
-- name: usage_insert
INSERT INTO blogqa.llm_usage (queue_id, url, stage, provider, model, prompt_tokens,
    completion_tokens, inputs, latency_ms, cost_usd)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)

-- The pipeline's ledger rows name their request: the rows of one request share request_id
-- (006_usage_request.sql), so its totals are the sums over its rows.
-- name: charge_insert
INSERT INTO blogqa.llm_usage (queue_id, url, stage, provider, model, prompt_tokens,
    completion_tokens, inputs, latency_ms, cost_usd, request_id)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)

-- The load's statement timeout, for its transaction only (is_local = true).
-- name: set_statement_timeout
SELECT set_config('statement_timeout', %s, true)

-- An unchanged page (304 or same content hash): only its fetch time and validators move.
-- name: touch_documents
UPDATE blogqa.documents d SET fetched_at = %s, etag = coalesce(v.etag, d.etag),
    last_modified = coalesce(v.last_modified, d.last_modified)
FROM unnest(%s::text[], %s::text[], %s::text[]) AS v(url, etag, last_modified)
WHERE d.url = v.url

-- Parameters: fetched_at, then one array per column in the order of the insert's list
-- (url first; store.DOCUMENT_COLUMNS for the rest).
-- name: upsert_documents
INSERT INTO blogqa.documents (url, canonical_url, title, author, published, site_name,
    language, text, word_count, content_hash, etag, last_modified, fetched_at)
SELECT v.*, %s::timestamptz FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[],
    %s::date[], %s::text[], %s::text[], %s::text[], %s::integer[], %s::text[], %s::text[],
    %s::text[]) AS v
ON CONFLICT (url) DO UPDATE SET canonical_url = EXCLUDED.canonical_url, title = EXCLUDED.title,
    author = EXCLUDED.author, published = EXCLUDED.published, site_name = EXCLUDED.site_name,
    language = EXCLUDED.language, text = EXCLUDED.text, word_count = EXCLUDED.word_count,
    content_hash = EXCLUDED.content_hash, etag = EXCLUDED.etag,
    last_modified = EXCLUDED.last_modified, fetched_at = EXCLUDED.fetched_at, updated_at = now()
RETURNING url, id

-- The queue rows still processing under the given ids and tokens, locked (in id order, so
-- two writers cannot deadlock) until the caller's transaction ends.
-- name: lock_held
SELECT q.id FROM blogqa.url_queue q
JOIN unnest(%s::bigint[], %s::uuid[]) AS r(id, token) ON q.id = r.id AND q.lease_token = r.token
WHERE q.status = 'processing'
ORDER BY q.id
FOR UPDATE OF q

-- A reloaded document's old outputs, before the COPYs below write the new ones.
-- name: delete_summaries
DELETE FROM blogqa.summaries WHERE document_id = ANY(%s)

-- name: delete_questions
DELETE FROM blogqa.questions WHERE document_id = ANY(%s)

-- name: delete_chunks
DELETE FROM blogqa.chunks WHERE document_id = ANY(%s)

-- Binary COPY: the fastest way to write many rows with vectors.
-- name: copy_summaries
COPY blogqa.summaries (document_id, summary, model, prompt_version, content_hash, embed_model,
    embedding) FROM STDIN (FORMAT BINARY)

-- name: copy_questions
COPY blogqa.questions (document_id, position, question, answer, model, prompt_version,
    embedding) FROM STDIN (FORMAT BINARY)

-- name: copy_chunks
COPY blogqa.chunks (document_id, position, text, tokens, embedding) FROM STDIN (FORMAT BINARY)

-- The work item a quarantined row kept, with what its lease was.
-- name: quarantined_item
SELECT q.id, q.url, q.attempts, w.lease_token, w.page, w.unchanged, w.llm_result, w.chunks,
       w.vectors
FROM blogqa.url_queue q JOIN blogqa.work_items w ON w.queue_id = q.id
WHERE q.id = %s AND q.status = 'quarantined'
