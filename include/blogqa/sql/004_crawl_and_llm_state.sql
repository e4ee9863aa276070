-- 004: state shared by every worker and run, so that politeness and back-pressure hold
-- across processes and not only inside one task.
--
-- robots_txt: one row per origin (scheme://host[:port]); a run reads it instead of fetching
-- robots.txt again while the row is younger than BLOGQA_ROBOTS_TTL_SECONDS. `status` is the
-- HTTP status of the fetch: 2xx rows carry the rules in `body`, 4xx rows mean "no rules"
-- (RFC 9309: allow everything). Server errors are never stored: they are retried.
CREATE TABLE blogqa.robots_txt (
    origin      text PRIMARY KEY,
    status      integer NOT NULL,
    body        text NOT NULL DEFAULT '',
    fetched_at  timestamptz NOT NULL DEFAULT now()
);

-- circuit_breakers: while open_until is in the future no task calls the endpoint named
-- `name`; URLs that reach the stage meanwhile go back to the queue without losing an attempt
-- (processing -> queued, released untried with the claim's attempt refunded: migration 001).
CREATE TABLE blogqa.circuit_breakers (
    name         text PRIMARY KEY,
    open_until   timestamptz,
    opened_count integer NOT NULL DEFAULT 0,
    last_reason  text,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
