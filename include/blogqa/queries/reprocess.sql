-- Reprocessing by cause (blogqa.reprocess).

-- Documents (by first fetch, documents.created_at, in [since, until)) whose stored rows the
-- cause makes stale: for `summaries` those made by another chat model or prompt version, for
-- `embeddings` those embedded by another model, for `all` (and with `force`) every one.
-- Queue rows being processed are skipped when locked (another transaction holds them) and
-- counted as in progress when not.
-- name: stale
SELECT q.id, q.url, q.status
FROM blogqa.documents d
JOIN blogqa.url_queue q ON q.url = d.url
LEFT JOIN blogqa.summaries s ON s.document_id = d.id
WHERE (%(since)s::timestamptz IS NULL OR d.created_at >= %(since)s::timestamptz)
  AND (%(until)s::timestamptz IS NULL OR d.created_at < %(until)s::timestamptz)
  AND (%(force)s OR %(cause)s = 'all'
       OR (%(cause)s = 'summaries' AND (s.model IS DISTINCT FROM %(chat_model)s
                                        OR s.prompt_version IS DISTINCT FROM %(prompt)s))
       OR (%(cause)s = 'embeddings' AND s.embed_model IS DISTINCT FROM %(embed_model)s))
  AND q.status IN ('done', 'queued', 'processing')
  AND (q.status <> 'queued' OR q.redo IS NULL OR %(rank)s > CASE q.redo
       WHEN 'embeddings' THEN 1 WHEN 'summaries' THEN 2 ELSE 3 END)
ORDER BY d.created_at, q.id
LIMIT %(limit)s FOR UPDATE OF q SKIP LOCKED

-- Only done rows are put back (done -> queued with a fresh attempt budget, due now);
-- queued rows just get the flag (the stronger cause wins).
-- name: requeue
UPDATE blogqa.url_queue q
SET redo = CASE WHEN q.redo IS NULL OR %(rank)s > CASE q.redo
                    WHEN 'embeddings' THEN 1 WHEN 'summaries' THEN 2 ELSE 3 END
                THEN %(cause)s ELSE q.redo END,
    status = 'queued',
    attempts = CASE WHEN q.status = 'done' THEN 0 ELSE q.attempts END,
    run_after = CASE WHEN q.status = 'done' THEN now() ELSE q.run_after END,
    finished_at = NULL,
    processing_ms = CASE WHEN q.status = 'done' THEN NULL ELSE q.processing_ms END,
    updated_at = now()
WHERE q.id = ANY(%(ids)s) AND q.status IN ('done', 'queued')
RETURNING q.id

-- A claimed row's reprocessing flag, and whether its stored copy is fresh.
-- name: redo_flags
SELECT q.id, q.redo,
       d.fetched_at IS NOT NULL AND d.fetched_at > now() - make_interval(days => %s)
FROM blogqa.url_queue q LEFT JOIN blogqa.documents d ON d.url = q.url
WHERE q.id = ANY(%s) AND q.redo IS NOT NULL

-- name: stored_qa
SELECT d.url, s.summary, s.model, s.prompt_version,
       coalesce(jsonb_agg(jsonb_build_object('question', q.question, 'answer', q.answer)
                          ORDER BY q.position) FILTER (WHERE q.id IS NOT NULL), '[]'::jsonb)
FROM blogqa.documents d
JOIN blogqa.summaries s ON s.document_id = d.id
LEFT JOIN blogqa.questions q ON q.document_id = d.id
WHERE d.url = ANY(%s)
GROUP BY d.url, s.summary, s.model, s.prompt_version
