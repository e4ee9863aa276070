-- Quarantined documents (blogqa.quarantine): how a row gets there and the three ways out.

-- processing -> quarantined, fenced by the lease token; the work item is kept.
-- name: quarantine
UPDATE blogqa.url_queue q
SET status = 'quarantined', finished_at = now(),
    processing_ms = (extract(epoch FROM now() - q.started_at) * 1000)::integer,
    last_error = %(message)s, last_stage = 'quality',
    quarantine_reasons = %(reasons)s, quarantined_run = %(run_id)s,
    error_history = {{queue.history_append}},
    lease_owner = NULL, lease_token = NULL, lease_until = NULL, updated_at = now()
WHERE q.id = %(id)s AND q.lease_token = %(token)s AND q.status = 'processing'
RETURNING q.id

-- The quarantined rows, of the given ids when the parameter (given twice) is not NULL.
-- name: list
SELECT id, url, quarantined_run, finished_at, attempts, quarantine_reasons
FROM blogqa.url_queue
WHERE status = 'quarantined' AND (%s::bigint[] IS NULL OR id = ANY(%s::bigint[]))
ORDER BY id

-- name: lock_by_id
SELECT id, url, status FROM blogqa.url_queue WHERE id = %s FOR UPDATE

-- name: lock_by_url
SELECT id, url, status FROM blogqa.url_queue WHERE url = %s FOR UPDATE

-- Release (quarantined -> done, set by queue.sql's mark_done in the same transaction): the
-- decision goes into the error history.
-- name: released
UPDATE blogqa.url_queue q
SET last_error = NULL, last_stage = NULL, error_history = {{queue.history_append}}
WHERE q.id = %(id)s

-- Requeue: quarantined -> queued, processed afresh with a fresh attempt budget.
-- name: requeue
UPDATE blogqa.url_queue q
SET status = 'queued', attempts = 0, run_after = now(), finished_at = NULL, started_at = NULL,
    processing_ms = NULL, last_error = NULL, last_stage = NULL, quarantine_reasons = NULL,
    error_history = {{queue.history_append}}, updated_at = now()
WHERE q.id = %(id)s

-- Drop: quarantined -> cancelled, never loaded (the reasons are kept).
-- name: drop
UPDATE blogqa.url_queue q
SET status = 'cancelled', finished_at = now(), last_error = %(message)s, last_stage = 'review',
    error_history = {{queue.history_append}}, updated_at = now()
WHERE q.id = %(id)s
