-- 010: which Airflow DAG run claimed a row last (`last_run_id`, the run's run_id; NULL for a
-- row never claimed, or claimed outside a DAG run). Set by every claim and kept after the row
-- ends, so a run's URLs can be listed by SQL (`WHERE last_run_id = '...'`) and `blogqa run`
-- reports what its runs did without reading Airflow's XCom. A row claimed again by a later
-- run moves to that run.
ALTER TABLE blogqa.url_queue ADD COLUMN last_run_id text;
CREATE INDEX url_queue_last_run_idx ON blogqa.url_queue (last_run_id)
    WHERE last_run_id IS NOT NULL;
