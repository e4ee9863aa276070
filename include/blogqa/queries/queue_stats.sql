-- Read-only counts over the URL queue (blogqa.queue_stats).

-- name: counts_by_status
SELECT status, count(*) FROM blogqa.url_queue GROUP BY status

-- name: queued_age_and_claimable
SELECT extract(epoch FROM now() - min(enqueued_at)),
       count(*) FILTER (WHERE run_after <= now())
FROM blogqa.url_queue WHERE status = 'queued'

-- Seconds until a row becomes claimable: a queued row's run_after, a processing row's lease.
-- name: next_due
SELECT extract(epoch FROM min(CASE WHEN status = 'queued' THEN run_after
                                   ELSE lease_until END) - now())
FROM blogqa.url_queue WHERE status IN ('queued', 'processing')

-- name: claimed_by_run
SELECT id FROM blogqa.url_queue WHERE last_run_id = %s ORDER BY id

-- name: status_counts
SELECT status, count(*) FROM blogqa.url_queue WHERE id = ANY(%s) GROUP BY status

-- Two index probes, not a count: a due queued row, or a processing row whose lease lapsed.
-- name: has_claimable
SELECT EXISTS (SELECT 1 FROM blogqa.url_queue WHERE status = 'queued'
                  AND run_after <= now())
    OR EXISTS (SELECT 1 FROM blogqa.url_queue
               WHERE status = 'processing' AND lease_until < now())
