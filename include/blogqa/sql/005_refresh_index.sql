-- 005: serves the nightly refresh (queue.requeue_stale): done rows, oldest finished first,
-- go back to queued with a fresh attempt budget (done -> queued, migration 001).
CREATE INDEX url_queue_done_finished_idx ON blogqa.url_queue (finished_at)
    WHERE status = 'done';
