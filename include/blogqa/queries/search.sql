-- Similarity search over the pgvector HNSW indexes, cosine distance (blogqa.search).

-- The chunks nearest a vector, leaving out one document (the query document of a "more like
-- this URL" search; NULL leaves out none).
-- name: nearest_chunks
SELECT c.id, c.document_id, c.position, d.url, d.title, c.text,
       1 - (c.embedding <=> %(v)s) AS score
FROM blogqa.chunks c JOIN blogqa.documents d ON d.id = c.document_id
WHERE c.document_id IS DISTINCT FROM %(exclude)s
ORDER BY c.embedding <=> %(v)s
LIMIT %(n)s

-- The similar search ranks 8 chunks per wanted document but shows one per document. Its
-- first query takes ids only; the second (chunks_by_id) reads text and score of the chunks
-- kept. The score reads (detoasts) each stored vector from the table, so computing it for
-- the k kept chunks rather than all 8k ranked ones saves most of the search's database time
-- on a large table (bench/api_bench.py). The HNSW index scan itself is the same as above.
-- name: nearest_ids
SELECT c.id, c.document_id
FROM blogqa.chunks c
WHERE c.document_id IS DISTINCT FROM %(exclude)s
ORDER BY c.embedding <=> %(v)s
LIMIT %(n)s

-- name: chunks_by_id
SELECT c.id, c.document_id, c.position, d.url, d.title, c.text,
       1 - (c.embedding <=> %(v)s) AS score
FROM blogqa.chunks c JOIN blogqa.documents d ON d.id = c.document_id
WHERE c.id = ANY(%(ids)s)

-- The chunks of one document nearest a vector, by exact distance: the widget answers from
-- the page the reader is on. MATERIALIZED keeps the planner off the HNSW index, which would
-- rank chunks of every document and filter afterwards (returning fewer than asked, or
-- none); a page has tens of chunks, found through the (document_id, position) unique index.
-- name: document_chunks
WITH own AS MATERIALIZED (
  SELECT c.id, c.document_id, c.position, c.text, c.embedding
  FROM blogqa.chunks c WHERE c.document_id = %(document)s
)
SELECT o.id, o.document_id, o.position, d.url, d.title, o.text,
       1 - (o.embedding <=> %(v)s) AS score
FROM own o JOIN blogqa.documents d ON d.id = o.document_id
ORDER BY o.embedding <=> %(v)s, o.position
LIMIT %(n)s

-- hnsw.ef_search for the current transaction only: `SET` takes no bind parameters,
-- set_config does (is_local = true). See search.py for when a search runs it.
-- name: ef_search
SELECT set_config('hnsw.ef_search', %s, true)
