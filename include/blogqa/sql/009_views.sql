-- 009: views for the common questions of SQL consumers (and the UI view and /metrics).
-- Read-only, granted to blogqa_reader like the tables (migration 003).

-- Model requests, tokens and cost per UTC day, provider and model. A request is counted once
-- although an embedding request has a row per document it served (migration 006); tokens and
-- cost are the sums of the rows (a request's shares add up to it). cost_usd is NULL when no
-- row of that group has a known price (a local or unpriced model).
CREATE VIEW blogqa.cost_per_day AS
SELECT (u.created_at AT TIME ZONE 'UTC')::date AS day,
       u.provider,
       u.model,
       count(DISTINCT u.request_id) AS requests,
       sum(u.prompt_tokens)::bigint AS prompt_tokens,
       sum(u.completion_tokens)::bigint AS completion_tokens,
       sum(u.cost_usd) AS cost_usd,
       array_agg(DISTINCT u.stage ORDER BY u.stage) AS stages
FROM blogqa.llm_usage u
GROUP BY 1, 2, 3;

-- URLs that will not be processed without a person: dead (attempts exhausted or a permanent
-- error) and quarantined (a failed quality expectation, when that status exists), with the
-- reason (the last error), the stage it happened in and the error class of the last attempt.
CREATE VIEW blogqa.dead_letters AS
SELECT q.id,
       q.url,
       q.status,
       q.last_stage AS stage,
       q.last_error AS reason,
       q.error_history -> -1 ->> 'class' AS error_class,
       q.attempts,
       q.max_attempts,
       q.enqueued_at,
       q.finished_at,
       q.error_history
FROM blogqa.url_queue q
WHERE q.status IN ('dead', 'quarantined');

-- Per DAG run (the run that claimed each URL last, url_queue.last_run_id): its URLs by
-- outcome, when its first URL started and its last one finished, and its throughput.
-- last_run_id comes with migration 010, applied after this one on a new database, so the
-- query lives in a SQL function whose body is checked when it runs, not now
-- (check_function_bodies off for this transaction only); the planner inlines it.
SET LOCAL check_function_bodies = off;
CREATE FUNCTION blogqa.run_outcomes()
RETURNS TABLE (
    run_id text,
    urls bigint,
    done bigint,
    dead bigint,
    skipped bigint,
    in_progress bigint,
    first_started_at timestamptz,
    last_finished_at timestamptz,
    seconds double precision,
    done_per_minute double precision
)
LANGUAGE sql STABLE AS $$
SELECT q.last_run_id,
       count(*),
       count(*) FILTER (WHERE q.status = 'done'),
       count(*) FILTER (WHERE q.status IN ('dead', 'quarantined')),
       count(*) FILTER (WHERE q.status IN ('skipped', 'cancelled')),
       count(*) FILTER (WHERE q.status IN ('queued', 'processing')),
       min(q.started_at),
       max(q.finished_at),
       extract(epoch FROM max(q.finished_at) - min(q.started_at))::double precision,
       CASE WHEN max(q.finished_at) > min(q.started_at)
            THEN count(*) FILTER (WHERE q.status = 'done') * 60.0
                 / extract(epoch FROM max(q.finished_at) - min(q.started_at))
       END::double precision
FROM blogqa.url_queue q
WHERE q.last_run_id IS NOT NULL
GROUP BY q.last_run_id
$$;
RESET check_function_bodies;

CREATE VIEW blogqa.recent_runs AS
SELECT * FROM blogqa.run_outcomes();

GRANT SELECT ON blogqa.cost_per_day, blogqa.dead_letters, blogqa.recent_runs TO blogqa_reader;
GRANT EXECUTE ON FUNCTION blogqa.run_outcomes() TO blogqa_reader;
