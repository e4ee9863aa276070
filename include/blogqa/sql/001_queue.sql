-- 001: the URL queue.
--
-- One row per normalized URL. Status transitions:
--   queued     -> processing   claimed by a worker (attempts + 1, lease set)
--   processing -> done         all stages succeeded and the outputs are loaded
--   processing -> queued       transient failure: retried after run_after (exponential backoff)
--   processing -> dead         permanent failure, or attempts exhausted
--   processing -> skipped      not processable by design (non-HTML, robots)
--   queued|processing -> cancelled  by an operator; a cancelled row is never processed
--   done|dead|skipped|cancelled -> queued  only when asked (enqueue --force, redrive)
-- A processing row whose lease_until has passed belongs to a dead worker: the next claim
-- puts it back to queued (or dead when its attempts are spent) before claiming.
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
