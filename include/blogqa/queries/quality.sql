-- Great Expectations results in PostgreSQL, the run's validation scope and the summaries
-- read back (blogqa.quality).

-- name: insert_result
INSERT INTO blogqa.quality_results (run_id, map_index, suite, expectation, column_name,
    blocking, success, observed, failing_ids, kwargs)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)

-- name: insert_validation
INSERT INTO blogqa.quality_validations (run_id, map_index, suite, success, result)
VALUES (%s, %s, %s, %s, %s)

-- A retried task instance replaces what its earlier try recorded (run_id, map_index).
-- name: delete_results
DELETE FROM blogqa.quality_results WHERE run_id = %s AND map_index = %s

-- name: delete_validations
DELETE FROM blogqa.quality_validations WHERE run_id = %s AND map_index = %s

-- A new validation scope: the view blogqa.quality_run_documents shows a connection the
-- documents of its scope (set with -c blogqa.quality_scope=<id>).
-- name: next_scope
SELECT nextval('blogqa.quality_scope_seq')

-- The run's loaded rows (scope id, queue ids); only done rows have documents.
-- name: fill_scope
INSERT INTO blogqa.quality_scopes (scope_id, queue_id)
SELECT %s, id FROM blogqa.url_queue WHERE id = ANY(%s) AND status = 'done'

-- name: drop_scope
DELETE FROM blogqa.quality_scopes WHERE scope_id = %s

-- The runs whose validations the Data Docs keep: the latest (by their latest validation; the
-- limit is the parameter).
-- name: latest_validation_runs
SELECT run_id FROM blogqa.quality_validations GROUP BY run_id ORDER BY max(id) DESC LIMIT %s

-- The stored validations of the runs given.
-- name: validations_of_runs
SELECT run_id, map_index, suite, result, created_at FROM blogqa.quality_validations
WHERE run_id = ANY(%s)
ORDER BY id

-- name: results_of_run
SELECT map_index, suite, expectation, column_name, blocking, success, observed,
       cardinality(failing_ids), failing_ids
FROM blogqa.quality_results WHERE run_id = %s ORDER BY map_index, suite, id

-- name: latest_run
SELECT run_id FROM blogqa.quality_results ORDER BY id DESC LIMIT 1

-- What became of the rows a run quarantined, by status.
-- name: quarantined_by_status
SELECT status, count(*) FROM blogqa.url_queue WHERE quarantined_run = %s GROUP BY status
