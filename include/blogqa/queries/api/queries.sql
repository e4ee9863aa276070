-- The API's read queries (blogqa.api.queries), on read-only connections. list_documents
-- builds its WHERE from the filters given, in code.

-- name: schema_present
SELECT to_regclass('blogqa.schema_migrations') IS NOT NULL AS present

-- name: queue_depth
SELECT count(*) AS n FROM blogqa.url_queue WHERE status IN ('queued', 'processing')

-- name: questions_of
SELECT document_id, id, position, question, answer FROM blogqa.questions
WHERE document_id = ANY(%s) ORDER BY document_id, position

-- A fragment: a document page in one statement, its columns, summary, chunk count and
-- questions (as one JSON array, in position order), instead of one query for the document
-- and one for its questions. The text only when asked: it is the largest column, read
-- (detoasted) only if used. Completed by document_by_id and document_by_url.
-- name: document_detail
SELECT d.id, d.url, d.title, d.author, d.published, d.site_name, d.language, d.word_count,
  d.fetched_at, q.question_count, d.canonical_url, d.content_hash, d.created_at, d.updated_at,
  CASE WHEN %(include_text)s THEN d.text END AS text,
  (SELECT count(*) FROM blogqa.chunks c WHERE c.document_id = d.id) AS chunk_count,
  s.summary, s.model, s.prompt_version, s.embed_model, s.created_at AS summary_created_at,
  q.questions
FROM blogqa.documents d
LEFT JOIN blogqa.summaries s ON s.document_id = d.id
CROSS JOIN LATERAL (
  SELECT count(*) AS question_count,
    coalesce(json_agg(json_build_object('id', q.id, 'position', q.position,
      'question', q.question, 'answer', q.answer) ORDER BY q.position), '[]') AS questions
  FROM blogqa.questions q WHERE q.document_id = d.id
) q

-- name: document_by_id
{{document_detail}}
WHERE d.id = %(value)s

-- name: document_by_url
{{document_detail}}
WHERE d.url = %(value)s

-- name: job_by_url
SELECT id, status, last_error FROM blogqa.url_queue WHERE url = %s

-- name: question
SELECT q.id, q.position, q.question, q.answer, q.document_id, q.created_at,
       d.url, d.title
FROM blogqa.questions q JOIN blogqa.documents d ON d.id = q.document_id
WHERE q.id = %s

-- The query document's summary vector, read in binary: as text, PostgreSQL would format
-- every float and the API parse them back, CPU spent on every by-URL search for nothing.
-- name: query_document
SELECT d.id, s.embedding FROM blogqa.documents d
JOIN blogqa.summaries s ON s.document_id = d.id WHERE d.url = %s

-- A fragment: the columns of a job (a queue row).
-- name: job_columns
q.id, q.url, q.status, q.priority, q.attempts, q.max_attempts, q.last_stage AS stage,
q.last_error, q.run_after, q.enqueued_at, q.started_at, q.finished_at, q.processing_ms,
q.updated_at

-- name: job_counts
SELECT status, count(*) AS n FROM blogqa.url_queue GROUP BY 1

-- name: job_oldest
SELECT extract(epoch FROM now() - min(enqueued_at)) AS age,
       count(*) FILTER (WHERE run_after <= now()) AS claimable
FROM blogqa.url_queue WHERE status = 'queued'

-- The last hour: rows done and dead, retries (error history entries), average wait from
-- enqueue to start and average processing time.
-- name: job_window
SELECT
  count(*) FILTER (WHERE status = 'done' AND finished_at > now() - interval '1 hour') AS done,
  count(*) FILTER (WHERE status = 'dead' AND finished_at > now() - interval '1 hour') AS failed,
  (SELECT count(*) FROM blogqa.url_queue r, jsonb_array_elements(r.error_history) e
   WHERE (e->>'at')::timestamptz > now() - interval '1 hour') AS retries,
  avg(extract(epoch FROM started_at - enqueued_at))
    FILTER (WHERE finished_at > now() - interval '1 hour' AND started_at IS NOT NULL) AS wait,
  avg(processing_ms / 1000.0)
    FILTER (WHERE status = 'done' AND finished_at > now() - interval '1 hour') AS processing
FROM blogqa.url_queue

-- name: list_jobs
SELECT {{job_columns}} FROM blogqa.url_queue q
WHERE %(status)s::text IS NULL OR q.status = %(status)s
ORDER BY q.updated_at DESC, q.id DESC LIMIT %(limit)s OFFSET %(offset)s

-- name: job
SELECT {{job_columns}}, q.lease_until, q.error_history, d.id AS document_id
FROM blogqa.url_queue q LEFT JOIN blogqa.documents d ON d.url = q.url
WHERE q.id = %s
