-- `blogqa quality` (blogqa.cli_quality).

-- The rows a run quarantined, whatever became of them since, with the reasons.
-- name: quarantined_by_run
SELECT id, url, status, quarantine_reasons FROM blogqa.url_queue
WHERE quarantined_run = %s ORDER BY id
