-- The circuit breakers' shared state (blogqa.breaker).

-- name: open_until
SELECT open_until FROM blogqa.circuit_breakers WHERE name = %s AND open_until > now()

-- A trip never shortens a cool-down another task opened.
-- name: trip
INSERT INTO blogqa.circuit_breakers (name, open_until, opened_count, last_reason, updated_at)
VALUES (%(name)s, now() + make_interval(secs => %(cooldown)s), 1, %(reason)s, now())
ON CONFLICT (name) DO UPDATE SET
    open_until = greatest(blogqa.circuit_breakers.open_until, EXCLUDED.open_until),
    opened_count = blogqa.circuit_breakers.opened_count + 1,
    last_reason = EXCLUDED.last_reason, updated_at = now()
RETURNING open_until
