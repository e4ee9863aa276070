-- Stored robots.txt files, shared by every worker and run (blogqa.politeness).

-- The fresh copies (fetched less than the TTL, in seconds, ago) of some origins.
-- name: load_robots
SELECT origin, status, body FROM blogqa.robots_txt
WHERE origin = ANY(%s) AND fetched_at > now() - make_interval(secs => %s)

-- name: save_robots
INSERT INTO blogqa.robots_txt (origin, status, body, fetched_at)
SELECT * FROM unnest(%s::text[], %s::integer[], %s::text[]), now()
ON CONFLICT (origin) DO UPDATE SET status = EXCLUDED.status, body = EXCLUDED.body,
    fetched_at = EXCLUDED.fetched_at
