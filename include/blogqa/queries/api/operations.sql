-- What operators read (blogqa.api.operations): the UI view and /metrics. The newest rows of
-- blogqa.quality_results are read in code, ordered by a column found at run time.

-- Queue rows per status: how many, the oldest (by enqueue time) and how many in each age band.
-- name: queue_by_status
SELECT status,
       count(*) AS n,
       extract(epoch FROM now() - min(enqueued_at))::double precision AS oldest_seconds,
       count(*) FILTER (WHERE enqueued_at > now() - interval '1 hour') AS under_1h,
       count(*) FILTER (WHERE enqueued_at <= now() - interval '1 hour'
                          AND enqueued_at > now() - interval '1 day') AS under_1d,
       count(*) FILTER (WHERE enqueued_at <= now() - interval '1 day') AS over_1d
FROM blogqa.url_queue
GROUP BY status

-- name: recent_runs
SELECT run_id, urls, done, dead, skipped, in_progress, first_started_at, last_finished_at,
       seconds, done_per_minute
FROM blogqa.recent_runs
ORDER BY first_started_at DESC NULLS LAST, run_id DESC
LIMIT %(limit)s

-- name: dead_letters
SELECT id, url, status, stage, reason, error_class, attempts, finished_at
FROM blogqa.dead_letters
ORDER BY finished_at DESC NULLS LAST, id DESC
LIMIT %(limit)s

-- name: dead_letter_count
SELECT count(*) AS n FROM blogqa.dead_letters

-- name: cost_per_day
SELECT day, provider, model, requests, prompt_tokens, completion_tokens, cost_usd
FROM blogqa.cost_per_day
WHERE day > (now() AT TIME ZONE 'UTC')::date - %(days)s
ORDER BY day DESC, provider, model

-- name: quality_table
SELECT to_regclass('blogqa.quality_results') IS NOT NULL AS present

-- name: quality_columns
SELECT column_name, data_type FROM information_schema.columns
WHERE table_schema = 'blogqa' AND table_name = 'quality_results'
ORDER BY ordinal_position

-- /metrics: counters over the whole ledger and queue.
-- name: model_totals
SELECT stage, provider, model,
       count(DISTINCT request_id) AS requests,
       coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
       coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens,
       coalesce(sum(cost_usd), 0)::double precision AS cost_usd
FROM blogqa.llm_usage
GROUP BY 1, 2, 3

-- Every recorded failed attempt (url_queue.error_history), by stage and error class.
-- name: failures
SELECT coalesce(e->>'stage', 'unknown') AS stage, coalesce(e->>'class', 'unknown') AS class,
       count(*) AS n
FROM blogqa.url_queue q, jsonb_array_elements(q.error_history) e
GROUP BY 1, 2

-- name: output_counts
SELECT (SELECT count(*) FROM blogqa.documents) AS documents,
       (SELECT count(*) FROM blogqa.questions) AS questions,
       (SELECT count(*) FROM blogqa.chunks) AS chunks
