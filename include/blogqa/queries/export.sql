-- `blogqa export` (blogqa.export): the question/answer dataset.

-- The supporting passage is an exact search among the page's own chunks: `+ 0` keeps the
-- planner off the HNSW index (which ranks every document's chunks and filters afterwards).
-- name: dataset
SELECT d.url, d.title, q.question, q.answer, sp.passage AS supporting_passage,
       s.model, s.prompt_version, d.id AS document_id, q.position, q.created_at
FROM blogqa.questions q
JOIN blogqa.documents d ON d.id = q.document_id
LEFT JOIN blogqa.summaries s ON s.document_id = d.id
LEFT JOIN LATERAL (
    SELECT c.text AS passage FROM blogqa.chunks c
    WHERE c.document_id = q.document_id
    ORDER BY (c.embedding <=> q.embedding) + 0, c.position
    LIMIT 1
) sp ON true
WHERE %(since)s::timestamptz IS NULL OR q.created_at >= %(since)s::timestamptz
ORDER BY d.id, q.position
