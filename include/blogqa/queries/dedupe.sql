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

-- A stored document at the page's declared canonical URL, or declaring the same one.
-- name: canonical
SELECT url FROM blogqa.documents
WHERE (url = %(canonical)s OR canonical_url IN (%(canonical)s, %(raw)s)) AND url <> %(url)s
ORDER BY (url = %(canonical)s) DESC, id
LIMIT 1

-- The declared canonical URL is queued or being processed (by this run's other chunks, or
-- another run): it will be stored, so the copy is not processed as well.
-- name: canonical_queued
SELECT url FROM blogqa.url_queue
WHERE url = %s AND status IN ('queued', 'processing')

-- Stored documents sharing at least one LSH band with the page.
-- name: candidates
SELECT d.url, f.minhash FROM blogqa.document_fingerprints f
JOIN blogqa.documents d ON d.id = f.document_id
WHERE f.bands && %s::bigint[] AND d.url <> %s

-- name: record
INSERT INTO blogqa.duplicates (url, queue_id, original_url, reason, similarity, content_hash)
VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (url) DO UPDATE SET queue_id = EXCLUDED.queue_id,
    original_url = EXCLUDED.original_url, reason = EXCLUDED.reason,
    similarity = EXCLUDED.similarity, content_hash = EXCLUDED.content_hash, detected_at = now()

-- name: forget
DELETE FROM blogqa.duplicates WHERE url = ANY(%s)
