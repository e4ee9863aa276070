-- 007: limits shared by every task process on every worker (blogqa.limits). One row per
-- scope: 'host <netloc>' for a crawled site, 'model <base url> <model>' for a model endpoint.
--   slots         holder id -> lease expiry (epoch seconds) of each request in flight; a
--                 holder renews its lease while it holds the slot, so the slot of a holder
--                 that was killed frees itself when its lease runs out
--   next_start    Crawl-delay: the earliest start of the host's next request (a reservation)
--   requests_tat  requests per minute, tokens per minute: the "theoretical arrival time" of
--   tokens_tat    a generic cell rate algorithm (a request may start while it is at most
--                 p_burst_seconds ahead of the clock)
--   paused_until  the server asked every client to wait (429 Retry-After, x-ratelimit-*)
-- Rows are rewritten on every acquire and release: fillfactor leaves room for HOT updates.
CREATE TABLE blogqa.shared_limits (
    scope text PRIMARY KEY,
    slots jsonb NOT NULL DEFAULT '{}'::jsonb,
    next_start timestamptz,
    requests_tat timestamptz,
    tokens_tat timestamptz,
    paused_until timestamptz,
    pause_reason text,
    updated_at timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50);

-- One round trip per attempt: lock the scope's row (microseconds; no transaction stays open
-- after the call), drop expired slots, and either grant (reserving a slot, the Crawl-delay
-- start and the rate budget) or refuse with how long to wait (NULL: all slots taken, poll).
-- A granted request may have to wait `wait_seconds` for its reserved start.
CREATE FUNCTION blogqa.limit_acquire(
    p_scope text,
    p_holder text,
    p_lease_seconds double precision,
    p_max_slots integer,             -- NULL: no concurrency cap (no slot is kept)
    p_spacing_seconds double precision,
    p_rpm double precision,          -- NULL: no requests/min limit
    p_tpm double precision,          -- NULL: no tokens/min limit
    p_tokens double precision,
    p_burst_seconds double precision,
    OUT granted boolean,
    OUT wait_seconds double precision,
    OUT reason text
) LANGUAGE plpgsql AS $$
DECLARE
    s blogqa.shared_limits;
    t timestamptz;
    t_epoch double precision;
    live jsonb;
    held integer;
    ready timestamptz;
    start_at timestamptz;
BEGIN
    INSERT INTO blogqa.shared_limits (scope) VALUES (p_scope) ON CONFLICT (scope) DO NOTHING;
    SELECT * INTO s FROM blogqa.shared_limits WHERE scope = p_scope FOR UPDATE;
    t := clock_timestamp();
    t_epoch := extract(epoch FROM t);
    SELECT coalesce(jsonb_object_agg(k, v), '{}'::jsonb), count(*) INTO live, held
        FROM jsonb_each(s.slots) AS e(k, v) WHERE (v #>> '{}')::double precision > t_epoch;

    ready := greatest(
        t,
        s.paused_until,
        CASE WHEN p_rpm IS NOT NULL THEN s.requests_tat - make_interval(secs => p_burst_seconds) END,
        CASE WHEN p_tpm IS NOT NULL THEN s.tokens_tat - make_interval(secs => p_burst_seconds) END
    );
    IF ready > t THEN
        granted := false;
        wait_seconds := extract(epoch FROM ready - t);
        reason := CASE WHEN s.paused_until >= ready THEN coalesce(s.pause_reason, 'paused')
                       ELSE 'rate limit' END;
        RETURN;
    END IF;
    IF p_max_slots IS NOT NULL AND held >= p_max_slots THEN
        IF live IS DISTINCT FROM s.slots THEN
            UPDATE blogqa.shared_limits SET slots = live, updated_at = t WHERE scope = p_scope;
        END IF;
        granted := false;
        wait_seconds := NULL;
        reason := 'all slots taken';
        RETURN;
    END IF;

    start_at := greatest(t, s.next_start);
    UPDATE blogqa.shared_limits SET
        slots = CASE WHEN p_max_slots IS NULL THEN live
                     ELSE live || jsonb_build_object(
                         p_holder, t_epoch + extract(epoch FROM start_at - t) + p_lease_seconds)
                END,
        next_start = CASE WHEN p_spacing_seconds > 0
                          THEN start_at + make_interval(secs => p_spacing_seconds)
                          ELSE next_start END,
        requests_tat = CASE WHEN p_rpm IS NOT NULL
                            THEN greatest(t, requests_tat) + make_interval(secs => 60.0 / p_rpm)
                            ELSE requests_tat END,
        tokens_tat = CASE WHEN p_tpm IS NOT NULL
                          THEN greatest(t, tokens_tat)
                               + make_interval(secs => 60.0 * p_tokens / p_tpm)
                          ELSE tokens_tat END,
        updated_at = t
    WHERE scope = p_scope;
    granted := true;
    wait_seconds := extract(epoch FROM start_at - t);
    reason := NULL;
END
$$;
