-- Limits shared by every task process (blogqa.limits), one row per scope of
-- blogqa.shared_limits (migration 007).

-- One attempt to take a slot / a start time / a rate budget (blogqa.limit_acquire).
-- name: acquire
SELECT granted, wait_seconds, reason FROM blogqa.limit_acquire(
    %(scope)s::text, %(holder)s::text, %(lease)s::float8, %(max_slots)s::integer,
    %(spacing)s::float8, %(rpm)s::float8, %(tpm)s::float8, %(tokens)s::float8, %(burst)s::float8)

-- Give a slot back and, with a positive pause, pause the scope (also used alone, holder '').
-- name: release
UPDATE blogqa.shared_limits SET
    slots = slots - %(holder)s::text,
    paused_until = CASE WHEN %(pause)s::float8 > 0
        THEN greatest(paused_until, clock_timestamp() + make_interval(secs => %(pause)s::float8))
        ELSE paused_until END,
    pause_reason = CASE WHEN %(pause)s::float8 > 0 THEN %(reason)s::text ELSE pause_reason END,
    updated_at = clock_timestamp()
WHERE scope = %(scope)s::text

-- name: renew
UPDATE blogqa.shared_limits SET
    slots = jsonb_set(slots, ARRAY[%(holder)s::text],
        to_jsonb(extract(epoch FROM clock_timestamp()) + %(lease)s::float8))
WHERE scope = %(scope)s::text AND slots ? %(holder)s::text

-- A request's token charge corrected by the usage the server reported (negative: refund).
-- name: correct_tokens
UPDATE blogqa.shared_limits
SET tokens_tat = tokens_tat + make_interval(secs => 60.0 * %(delta)s::float8 / %(tpm)s::float8)
WHERE scope = %(scope)s::text AND tokens_tat IS NOT NULL

-- name: state
SELECT * FROM blogqa.shared_limits WHERE scope = %(scope)s::text
