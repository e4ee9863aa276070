-- Duplicates paid once (blogqa.dedupe): stored fingerprints and the crawl stage's checks.

-- name: delete_fingerprints
DELETE FROM blogqa.document_fingerprints WHERE document_id = ANY(%s)

-- name: save_fingerprint
INSERT INTO blogqa.document_fingerprints (document_id, content_hash, minhash, bands)
VALUES (%s, %s, %s, %s)

-- name: backfill_done
SELECT 1 FROM blogqa.settings WHERE key = %s

-- Stored documents with no fingerprint of their current content, long enough to compare.
-- name: backfill
SELECT d.id, d.text, d.content_hash FROM blogqa.documents d
WHERE NOT EXISTS (SELECT 1 FROM blogqa.document_fingerprints f
                  WHERE f.document_id = d.id AND f.content_hash = d.content_hash)
  AND d.word_count >= %s
ORDER BY d.id
LIMIT %s

-- name: mark_backfill_done
INSERT INTO blogqa.settings (key, value) VALUES (%s, 'true')
ON CONFLICT (key) DO NOTHING

-- Per page of a batch (position, declared canonical URL in queue form, as declared, its own
-- URL): a stored document at the declared canonical URL or declaring the same one, else the
-- canonical URL if it is queued or being processed (by this run's other chunks, or another
-- run: it will be stored, so the copy is not processed as well). Pages with neither are left
-- out.
-- name: declared_originals
SELECT p.i, COALESCE(stored.url, queued.url)
FROM unnest(%s::int[], %s::text[], %s::text[], %s::text[]) AS p(i, canonical, raw, url)
LEFT JOIN LATERAL (
    SELECT d.url FROM blogqa.documents d
    WHERE (d.url = p.canonical OR d.canonical_url IN (p.canonical, p.raw)) AND d.url <> p.url
    ORDER BY (d.url = p.canonical) DESC, d.id
    LIMIT 1
) stored ON true
LEFT JOIN LATERAL (
    SELECT q.url FROM blogqa.url_queue q
    WHERE q.url = p.canonical AND q.status IN ('queued', 'processing')
    LIMIT 1
) queued ON true
WHERE stored.url IS NOT NULL OR queued.url IS NOT NULL

-- Stored documents sharing at least one LSH band with a page of a batch: the pages' bands as
-- (position, band) pairs, then the pages' positions and URLs (a page's own document is not
-- a candidate).
-- name: candidates
SELECT DISTINCT b.i, d.url, f.minhash
FROM unnest(%s::int[], %s::bigint[]) AS b(i, band)
JOIN unnest(%s::int[], %s::text[]) AS p(i, url) ON p.i = b.i
JOIN blogqa.document_fingerprints f ON f.bands @> ARRAY[b.band]
JOIN blogqa.documents d ON d.id = f.document_id
WHERE d.url <> p.url

-- name: record
INSERT INTO blogqa.duplicates (url, queue_id, original_url, reason, similarity, content_hash)
VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (url) DO UPDATE SET queue_id = EXCLUDED.queue_id,
    original_url = EXCLUDED.original_url, reason = EXCLUDED.reason,
    similarity = EXCLUDED.similarity, content_hash = EXCLUDED.content_hash, detected_at = now()

-- name: forget
DELETE FROM blogqa.duplicates WHERE url = ANY(%s)
