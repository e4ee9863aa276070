-- 008: the quality gate (blogqa.quality, expectation suites in blogqa/expectations/*.json).
--
-- New queue status `quarantined` (the rest of the state machine: migration 001), final for
-- the pipeline (a run's tally counts it) and waiting for a person, in the DAG's review task
-- or with `blogqa quarantine`:
--   processing  -> quarantined  the validate task found a blocking expectation failed for the
--                               document (fenced by the lease token); nothing is loaded, the
--                               work item (page, summary, questions, vectors) is kept and the
--                               failed expectations with their observed values are in
--                               quarantine_reasons
--   quarantined -> done         released (review "Release" / `blogqa quarantine release`):
--                               the kept work item is loaded as it is
--   quarantined -> queued       requeued: attempts reset, work item dropped, processed afresh
--   quarantined -> cancelled    dropped: never loaded, never processed again unless enqueued
--                               with --force (which does not touch a row still quarantined)
-- Each of the three appends the reviewer's decision to the row's error history.
ALTER TABLE blogqa.url_queue DROP CONSTRAINT url_queue_status_check;
ALTER TABLE blogqa.url_queue ADD CONSTRAINT url_queue_status_check
    CHECK (status IN ('queued', 'processing', 'done', 'dead', 'skipped', 'cancelled',
                      'quarantined'));
-- [{suite, expectation, column, observed, blocking}, ...] of the last validation that
-- quarantined the row (NULL otherwise).
ALTER TABLE blogqa.url_queue ADD COLUMN quarantine_reasons jsonb;
ALTER TABLE blogqa.url_queue ADD COLUMN quarantined_run text;
CREATE INDEX url_queue_quarantined_idx ON blogqa.url_queue (id) WHERE status = 'quarantined';

-- One row per expectation per validation: the chunk validations of the validate task
-- (map_index = the chunk) and the run's table-level validation (map_index = -1). For SQL
-- consumers: which checks failed, for which queue ids, with what observed value.
CREATE TABLE blogqa.quality_results (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id          text NOT NULL,
    map_index       integer NOT NULL,
    suite           text NOT NULL,
    expectation     text NOT NULL,
    column_name     text,
    blocking        boolean NOT NULL,
    success         boolean NOT NULL,
    observed        jsonb,
    failing_ids     bigint[] NOT NULL DEFAULT '{}',
    kwargs          jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX quality_results_run_idx ON blogqa.quality_results (run_id, map_index);

-- The whole Great Expectations validation result of each suite run (JSON), from which the
-- Data Docs are built wherever they are served.
CREATE TABLE blogqa.quality_validations (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id          text NOT NULL,
    map_index       integer NOT NULL,
    suite           text NOT NULL,
    success         boolean NOT NULL,
    result          jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX quality_validations_run_idx ON blogqa.quality_validations (run_id);

-- The documents a run loaded, for the table-level validation: a scope is one validation,
-- its rows the queue ids done in that run. The view below shows the scope named by the
-- session setting blogqa.quality_scope (set as a connection option by the SQL data source
-- of that validation), so each validation sees only its run's documents.
CREATE TABLE blogqa.quality_scopes (
    scope_id        bigint NOT NULL,
    queue_id        bigint NOT NULL,
    PRIMARY KEY (scope_id, queue_id)
);
CREATE SEQUENCE blogqa.quality_scope_seq;

CREATE VIEW blogqa.quality_run_documents AS
SELECT s.scope_id,
       q.id AS queue_id,
       q.url,
       d.id AS document_id,
       d.content_hash,
       sm.content_hash AS summary_content_hash,
       (SELECT count(*) FROM blogqa.documents d2 WHERE d2.url = q.url) AS copies,
       (SELECT count(*) FROM blogqa.questions x WHERE x.document_id = d.id) AS questions,
       (SELECT count(*) FROM blogqa.questions x
         WHERE x.document_id = d.id AND x.embedding IS NULL) AS null_question_vectors,
       (SELECT count(*) FROM blogqa.chunks c WHERE c.document_id = d.id) AS chunks,
       (SELECT count(*) FROM blogqa.chunks c
         WHERE c.document_id = d.id AND c.embedding IS NULL) AS null_chunk_vectors,
       (sm.embedding IS NULL) AS null_summary_vector
FROM blogqa.quality_scopes s
JOIN blogqa.url_queue q ON q.id = s.queue_id
LEFT JOIN blogqa.documents d ON d.url = q.url
LEFT JOIN blogqa.summaries sm ON sm.document_id = d.id
WHERE s.scope_id = nullif(current_setting('blogqa.quality_scope', true), '')::bigint;
