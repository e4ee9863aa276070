-- Operator actions on queue rows (blogqa.queue_admin): `blogqa cancel|requeue|errors`.

-- name: lock_by_id
SELECT id, url, status, lease_owner FROM blogqa.url_queue WHERE id = %s FOR UPDATE

-- name: lock_by_url
SELECT id, url, status, lease_owner FROM blogqa.url_queue WHERE url = %s FOR UPDATE

-- queued or processing -> cancelled. Clearing the lease token fences out a worker still
-- holding the row.
-- name: cancel
UPDATE blogqa.url_queue q
SET status = 'cancelled', finished_at = now(), last_error = %(message)s, last_stage = 'cancel',
    error_history = {{queue.history_append}},
    lease_owner = NULL, lease_token = NULL, lease_until = NULL, updated_at = now()
WHERE q.id = %(id)s AND q.status IN ('queued', 'processing')
RETURNING q.id

-- Redrive: dead -> queued with a fresh attempt budget, due now (optionally only the rows that
-- died at %(stage)s, or at or after %(since)s); the error history is kept.
-- name: redrive
UPDATE blogqa.url_queue q
SET status = 'queued', attempts = 0, run_after = now(), finished_at = NULL,
    started_at = NULL, processing_ms = NULL, last_error = NULL, last_stage = NULL,
    error_history = {{queue.history_append}},
    lease_owner = NULL, lease_token = NULL, lease_until = NULL, updated_at = now()
WHERE q.status = 'dead'
  AND (%(stage)s::text IS NULL OR q.last_stage = %(stage)s::text)
  AND (%(since)s::timestamptz IS NULL OR q.finished_at >= %(since)s::timestamptz)
RETURNING q.id, q.url

-- name: recent_errors
SELECT id, url, status, last_stage, attempts, max_attempts, last_error, updated_at,
       CASE WHEN status = 'queued' THEN run_after END
FROM blogqa.url_queue
WHERE last_error IS NOT NULL
ORDER BY updated_at DESC, id DESC
LIMIT %s
