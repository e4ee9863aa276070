-- Batch mode's summarize step (blogqa.batch_stage). Fenced like every write after the
-- claim: only rows still processing under the caller's lease tokens.

-- The batch the pages were submitted in, stored so a retried task waits for it instead of
-- submitting (and paying for) the pages again.
-- name: mark_submitted
UPDATE blogqa.work_items w SET batch_id = %(batch_id)s, updated_at = now()
FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS v(id, token)
JOIN blogqa.url_queue q ON q.id = v.id AND q.lease_token = v.token AND q.status = 'processing'
WHERE w.queue_id = v.id AND w.lease_token = v.token
RETURNING w.queue_id

-- name: submitted
SELECT w.queue_id, w.batch_id
FROM blogqa.work_items w
JOIN unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS v(id, token)
    ON w.queue_id = v.id AND w.lease_token = v.token
WHERE w.batch_id IS NOT NULL
