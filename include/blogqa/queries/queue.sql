-- The URL queue's row transitions (blogqa.queue). Every write after the claim is fenced by
-- the lease token: `WHERE ... lease_token = <the caller's> AND status = 'processing'`.

-- name: enqueue_new
INSERT INTO blogqa.url_queue (url, priority, max_attempts)
SELECT u, %s, %s FROM unnest(%s::text[]) AS u
ON CONFLICT (url) DO NOTHING RETURNING url

-- `enqueue --force`: finished rows (not quarantined ones, which wait for a reviewer) go
-- back to queued with a fresh attempt budget.
-- name: enqueue_force
UPDATE blogqa.url_queue SET status = 'queued', attempts = 0,
    max_attempts = %s, priority = %s, run_after = now(), lease_owner = NULL,
    lease_token = NULL, lease_until = NULL, last_error = NULL, last_stage = NULL,
    started_at = NULL, finished_at = NULL, processing_ms = NULL,
    enqueued_at = now(), updated_at = now()
WHERE url = ANY(%s) AND status IN ('done', 'dead', 'skipped', 'cancelled')
RETURNING url

-- name: status_of_urls
SELECT url, status FROM blogqa.url_queue WHERE url = ANY(%s)

-- A fragment (included, not run alone): the row's error history with %(entry)s appended
-- (plus the attempt and time), keeping the last %(keep)s entries, so the history stays
-- bounded however often a row fails. Used by queue_admin.sql and quarantine.sql too.
-- name: history_append
(
        SELECT coalesce(jsonb_agg(e ORDER BY i), '[]'::jsonb)
        FROM jsonb_array_elements(q.error_history || (%(entry)s::jsonb
                 || jsonb_build_object('attempt', q.attempts, 'at', now())))
             WITH ORDINALITY AS t(e, i)
        WHERE i > jsonb_array_length(q.error_history) + 1 - %(keep)s
    )

-- A fragment: whether no work had started on a processing row under its current lease.
-- A lapsed lease costs an attempt only when work had started under it. "Not started" means
-- no stage ever picked the row up since the claim (every stage first renews its leases,
-- which moves updated_at past the claim's started_at; renew_claim, which keeps waiting rows
-- alive, leaves updated_at alone) and no work item was saved under it. Such a row only
-- waited (its chunk's crawl never ran, the run died) and is refunded. A row a stage had
-- started on is charged, even without a work item: a page whose crawl hangs or kills the
-- task every time must still reach `dead` rather than be refunded forever.
-- name: not_started
(q.updated_at = q.started_at AND NOT EXISTS (
        SELECT 1 FROM blogqa.work_items w
        WHERE w.queue_id = q.id AND w.lease_token = q.lease_token))

-- Run first in every claim: processing rows whose lease lapsed go back to queued (or to
-- dead once their attempts are spent); an unstarted row gets its attempt back.
-- name: recover_expired
UPDATE blogqa.url_queue q
SET status = CASE WHEN NOT r.unstarted AND q.attempts >= q.max_attempts
                  THEN 'dead' ELSE 'queued' END,
    finished_at = CASE WHEN NOT r.unstarted AND q.attempts >= q.max_attempts THEN now() END,
    attempts = CASE WHEN r.unstarted THEN greatest(q.attempts - 1, 0) ELSE q.attempts END,
    run_after = now(),
    last_error = CASE WHEN r.unstarted THEN %(unstarted)s::text
                 ELSE 'lease expired: the worker holding it stopped or ran out of time' END,
    last_stage = 'lease',
    error_history = (
        SELECT coalesce(jsonb_agg(e ORDER BY i), '[]'::jsonb)
        FROM jsonb_array_elements(q.error_history || CASE WHEN r.unstarted
                 THEN jsonb_build_object(
                     'attempt', q.attempts, 'stage', 'lease', 'class', 'lease',
                     'message', %(unstarted)s::text || ' (owner '
                         || coalesce(q.lease_owner, '?') || ')',
                     'at', now())
                 ELSE jsonb_build_object(
                     'attempt', q.attempts, 'stage', 'lease', 'class', 'transient',
                     'message', 'lease expired (owner ' || coalesce(q.lease_owner, '?') || ')',
                     'at', now()) END) WITH ORDINALITY AS t(e, i)
        WHERE i > jsonb_array_length(q.error_history) + 1 - %(keep)s
    ),
    lease_owner = NULL, lease_token = NULL, lease_until = NULL, updated_at = now()
FROM (
    SELECT q.id, {{not_started}} AS unstarted
    FROM blogqa.url_queue q
    WHERE q.status = 'processing' AND q.lease_until < now()
    FOR UPDATE OF q SKIP LOCKED
) AS r
WHERE q.id = r.id
RETURNING q.id, q.url, r.unstarted

-- queued -> processing: the due rows, highest priority first, skipping rows another claim
-- holds; one attempt is charged and a fresh lease token fences every later write.
-- name: claim
UPDATE blogqa.url_queue q
SET status = 'processing',
    attempts = q.attempts + 1,
    lease_owner = %(owner)s,
    last_run_id = %(run_id)s,
    lease_token = gen_random_uuid(),
    lease_until = now() + make_interval(secs => %(lease_seconds)s),
    started_at = now(),
    updated_at = now()
WHERE q.id IN (
    SELECT id FROM blogqa.url_queue
    WHERE status = 'queued' AND run_after <= now()
    ORDER BY priority DESC, run_after, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING q.id, q.url, q.lease_token, q.attempts, q.priority

-- Every statement that locks several url_queue rows takes the locks in id order (ORDER BY
-- q.id FOR UPDATE), and renewing a whole claim skips the rows another transaction holds:
-- tasks of one run lock overlapping sets of rows at once (a chunk's own rows, the whole
-- claim), and locks taken in two orders deadlock (PostgreSQL then aborts one task).
-- name: renew
WITH held AS (
    SELECT q.id FROM blogqa.url_queue q
    JOIN unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS r(id, token)
        ON q.id = r.id AND q.lease_token = r.token
    WHERE q.status = 'processing'
    ORDER BY q.id
    FOR UPDATE OF q
)
UPDATE blogqa.url_queue q
SET lease_until = now() + make_interval(secs => %(seconds)s), updated_at = now()
FROM held WHERE q.id = held.id
RETURNING q.id, q.url, q.lease_token, q.attempts

-- Leases of every row of the claims that the given refs came from (a claim is its rows'
-- lease_owner and started_at, both set by `claim` in one transaction), still processing
-- under that claim: rows of chunks that are only waiting for their next task included.
-- updated_at is left alone: a row kept alive this way has not been started (not_started).
-- Rows another transaction holds are skipped, not waited for: that transaction is a task
-- working on them (it renews them itself), and waiting would join a lock cycle. Rows with
-- most of a term still ahead (queue.RENEW_CLAIM_FRESH: renewed moments ago, by the claim or
-- another stage end) are left as they are: every stage end of every chunk renews the whole
-- claim, and rewriting each row each time was most of the queue's writes in a large run.
-- name: renew_claim
WITH claim AS (
    SELECT DISTINCT s.lease_owner, s.started_at
    FROM blogqa.url_queue s JOIN unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS r(id, token)
        ON s.id = r.id AND s.lease_token = r.token
    WHERE s.status = 'processing'
), free AS (
    SELECT q.id FROM blogqa.url_queue q
    JOIN claim c ON q.lease_owner = c.lease_owner AND q.started_at = c.started_at
    WHERE q.status = 'processing'
        AND q.lease_until < now() + make_interval(secs => %(fresh_until)s)
    ORDER BY q.id
    FOR UPDATE OF q SKIP LOCKED
)
UPDATE blogqa.url_queue q
SET lease_until = greatest(q.lease_until, now() + make_interval(secs => %(seconds)s))
FROM free WHERE q.id = free.id

-- A fragment: the SET of a row becoming done. `redo` (a reprocessing flag, migration 011)
-- is spent once the row is done.
-- name: done_set
SET status = 'done', finished_at = now(), last_error = NULL, last_stage = NULL, redo = NULL,
    processing_ms = (extract(epoch FROM now() - started_at) * 1000)::integer,
    lease_owner = NULL, lease_token = NULL, lease_until = NULL, updated_at = now()

-- processing -> done, fenced by the lease token.
-- name: complete
UPDATE blogqa.url_queue {{done_set}}
WHERE id = %s AND lease_token = %s AND status = 'processing'

-- -> done for rows the caller has locked and verified (the load; a reviewer's release of a
-- quarantined row).
-- name: mark_done
UPDATE blogqa.url_queue {{done_set}} WHERE id = ANY(%s)

-- name: max_attempts
SELECT max_attempts FROM blogqa.url_queue WHERE id = %s

-- processing -> queued (a retry after %(delay)s seconds) or a terminal status (dead,
-- skipped), fenced by the lease token.
-- name: fail
UPDATE blogqa.url_queue q
SET status = %(status)s,
    run_after = now() + make_interval(secs => %(delay)s),
    finished_at = CASE WHEN %(status)s = 'queued' THEN NULL ELSE now() END,
    processing_ms = (extract(epoch FROM now() - q.started_at) * 1000)::integer,
    last_error = %(message)s,
    last_stage = %(stage)s,
    error_history = {{history_append}},
    lease_owner = NULL, lease_token = NULL, lease_until = NULL, updated_at = now()
WHERE q.id = %(id)s AND q.lease_token = %(token)s AND q.status = 'processing'
RETURNING q.status

-- The intermediate results (blogqa.work_items) of rows that will not read them again: a row
-- that ends (done, dead, skipped, cancelled) or is requeued afresh. One statement for every
-- caller (queue, queue_admin, quarantine, store); the parameter is a list of queue ids.
-- name: delete_work_items
DELETE FROM blogqa.work_items WHERE queue_id = ANY(%s)

-- processing -> queued untried (an open circuit breaker): the claim's attempt is refunded.
-- name: release
UPDATE blogqa.url_queue q
SET status = 'queued',
    attempts = greatest(q.attempts - 1, 0),
    run_after = now() + make_interval(secs => %(delay)s),
    started_at = NULL,
    last_error = %(message)s,
    last_stage = %(stage)s,
    error_history = {{history_append}},
    lease_owner = NULL, lease_token = NULL, lease_until = NULL, updated_at = now()
FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS r(id, token)
WHERE q.id = r.id AND q.lease_token = r.token AND q.status = 'processing'
RETURNING q.id

-- Refresh: done -> queued for rows finished longer ago than the given interval, oldest
-- first, with a fresh attempt budget.
-- name: requeue_stale
UPDATE blogqa.url_queue q
SET status = 'queued', attempts = 0, run_after = now(), finished_at = NULL, started_at = NULL,
    processing_ms = NULL, updated_at = now()
WHERE q.id IN (
    SELECT id FROM blogqa.url_queue
    WHERE status = 'done' AND finished_at < now() - %s
    ORDER BY finished_at
    LIMIT %s
    FOR UPDATE SKIP LOCKED
)
