-- What `blogqa demo` prints after its run (blogqa.cli).

-- Model requests in the ledger: an embedding request has a row per document it served.
-- name: model_calls
SELECT count(DISTINCT request_id) FROM blogqa.llm_usage

-- One of the given URLs' documents with its questions, as an example.
-- name: example_document
SELECT title, url, summary, questions FROM blogqa.document_qa WHERE url = ANY(%s)
ORDER BY url LIMIT 1
