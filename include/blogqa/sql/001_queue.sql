-- 001: the URL queue.
--
-- One row per normalized URL (blogqa.urls). The whole state machine as the code runs it
-- (blogqa.queue, blogqa.retry, blogqa.queue_admin, blogqa.quarantine, blogqa.reprocess; the
-- statements are in blogqa/queries/*.sql); later migrations add a status or a column, marked
-- with their number:
--   (new URL)   -> queued       enqueue: `blogqa enqueue`, the DAG param `urls`, a sources poll
--   queued      -> processing   claimed, due rows by priority then age, skipping rows another
--                               claim holds: attempts + 1, a fresh lease_token, lease_until,
--                               started_at (and last_run_id, 010)
--   processing  -> processing   lease renewed: by the stage working on the row (updated_at
--                               moves past started_at: work has started), or with its whole
--                               claim while its chunk waits for a task (updated_at kept)
--   processing  -> done         loaded (its work item is deleted in the same transaction)
--   processing  -> queued       transient failure: the attempt is spent and the row retried
--                               after run_after (exponential backoff with jitter, capped,
--                               never before the site's Retry-After); the work item is
--                               kept
--   processing  -> queued       released untried (an open circuit breaker, 004): the
--                               claim's attempt is refunded
--   processing  -> dead         permanent failure, or a transient one with attempts spent
--   processing  -> skipped      not processable by design (non-HTML, robots.txt, a duplicate
--                               of a stored document, 011)
--   processing  -> quarantined  (008) a blocking quality expectation failed: see 008
--   processing  -> queued|dead  the lease lapsed (the worker died, the run stopped): the next
--                               claim recovers the row before claiming. If no work had
--                               started under that lease (updated_at = started_at and no
--                               work item saved under its token) the row only waited: queued,
--                               attempt refunded. Otherwise the attempt is charged: queued,
--                               or dead once attempts >= max_attempts.
--   queued|processing -> cancelled  by an operator (`blogqa cancel`): the lease token is
--                               cleared, so a worker still holding the row is fenced out
--   dead        -> queued       redrive (`blogqa requeue`): attempts 0, error history kept
--   done|dead|skipped|cancelled -> queued  `blogqa enqueue --force` (and a sources poll for
--                               a changed entry): attempts 0
--   done        -> queued       refresh: rows finished longer ago than the refresh age,
--                               oldest first (index of 005): attempts 0, the refetch is a
--                               conditional GET
--   done        -> queued       reprocess (011): attempts 0, with a `redo` cause; a queued
--                               row only gets the flag, a processing row is left alone
--   quarantined -> done|queued|cancelled  a reviewer's release, requeue or drop (008)
-- done, dead, skipped, cancelled and quarantined are final for a DAG run (its tally counts
-- them). Every write after the claim is fenced by lease_token (the holder's token and status
-- 'processing'): a worker whose row was recovered, re-claimed or cancelled changes nothing.
-- A failure that ends the row (dead, skipped), a cancel, a redrive and a reviewer's requeue
-- or drop delete its work item (blogqa.work_items, 002). error_history keeps a bounded list
-- of the latest entries: failures, lease refunds, releases, operator and reviewer actions.
CREATE SCHEMA IF NOT EXISTS blogqa;

CREATE TABLE blogqa.url_queue (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url             text NOT NULL UNIQUE,
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'processing', 'done', 'dead', 'skipped', 'cancelled')),
    priority        integer NOT NULL DEFAULT 0,
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts    integer NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    run_after       timestamptz NOT NULL DEFAULT now(),
    lease_owner     text,
    lease_token     uuid,
    lease_until     timestamptz,
    last_error      text,
    last_stage      text,
    error_history   jsonb NOT NULL DEFAULT '[]'::jsonb,
    enqueued_at     timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    processing_ms   integer,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Serves the claim: highest priority first, then oldest, among rows that are due.
CREATE INDEX url_queue_claim_idx ON blogqa.url_queue (priority DESC, run_after, id)
    WHERE status = 'queued';
-- Serves stuck-job recovery (expired leases).
CREATE INDEX url_queue_lease_idx ON blogqa.url_queue (lease_until)
    WHERE status = 'processing';
CREATE INDEX url_queue_status_idx ON blogqa.url_queue (status);
