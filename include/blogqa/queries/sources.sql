-- Feeds, sitemaps and sites polled for new or changed URLs (blogqa.sources).

-- Following a source again updates its kind and limit and enables it.
-- name: add
INSERT INTO blogqa.sources (url, kind, max_per_poll) VALUES (%s, %s, %s)
ON CONFLICT (url) DO UPDATE SET kind = EXCLUDED.kind, max_per_poll = EXCLUDED.max_per_poll,
    enabled = true
RETURNING id, url, kind, max_per_poll, enabled, created_at

-- name: remove_by_id
DELETE FROM blogqa.sources WHERE id = %s

-- name: remove_by_url
DELETE FROM blogqa.sources WHERE url = %s

-- name: list
SELECT id, url, kind, max_per_poll, enabled, last_polled_at, last_status, last_error,
       last_found, last_enqueued, created_at
FROM blogqa.sources ORDER BY id

-- name: upsert_entries
INSERT INTO blogqa.source_entries (source_id, url)
SELECT %s, u FROM unnest(%s::text[]) AS u
ON CONFLICT (source_id, url) DO NOTHING

-- New entries (never enqueued) and entries whose lastmod changed since they were enqueued,
-- newest first.
-- name: due
SELECT e.url, v.lastmod, e.enqueued_at IS NOT NULL AS seen
FROM blogqa.source_entries e
JOIN unnest(%s::text[], %s::text[]) AS v(url, lastmod) ON v.url = e.url
WHERE e.source_id = %s
  AND (e.enqueued_at IS NULL OR e.lastmod IS DISTINCT FROM v.lastmod)
ORDER BY v.lastmod DESC NULLS LAST, e.url

-- Entries not listed this time (a 304) but never enqueued: the backlog of earlier polls.
-- name: backlog
SELECT url, lastmod, false FROM blogqa.source_entries
WHERE source_id = %s AND enqueued_at IS NULL
ORDER BY lastmod DESC NULLS LAST, url

-- name: mark_enqueued
UPDATE blogqa.source_entries e SET enqueued_at = now(), lastmod = v.lastmod
FROM unnest(%s::text[], %s::text[]) AS v(url, lastmod)
WHERE e.source_id = %s AND e.url = v.url

-- name: pending_lastmod
UPDATE blogqa.source_entries e SET lastmod = v.lastmod
FROM unnest(%s::text[], %s::text[]) AS v(url, lastmod)
WHERE e.source_id = %s AND e.url = v.url AND e.enqueued_at IS NULL

-- name: source_polled
UPDATE blogqa.sources SET last_polled_at = now(), last_status = %s, last_error = %s,
    last_found = %s, last_enqueued = %s, etag = coalesce(%s, etag),
    last_modified = coalesce(%s, last_modified)
WHERE id = %s

-- name: sources_due
SELECT id, url, kind, max_per_poll, etag, last_modified FROM blogqa.sources
WHERE enabled ORDER BY last_polled_at NULLS FIRST, id
