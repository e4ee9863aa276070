-- The publisher widget's reads (blogqa.api.widget).

-- A page's title and questions, by its normalized URL (documents.url is unique).
-- name: page
SELECT d.id, d.url, d.title,
  coalesce(json_agg(json_build_object('question', q.question, 'answer', q.answer)
                    ORDER BY q.position) FILTER (WHERE q.id IS NOT NULL), '[]') AS questions
FROM blogqa.documents d
LEFT JOIN blogqa.questions q ON q.document_id = d.id
WHERE d.url = %(url)s
GROUP BY d.id

-- A page found under its canonical URL when the reader's address is another one.
-- name: canonical
SELECT url FROM blogqa.documents WHERE canonical_url = %(url)s LIMIT 1
