-- 002: output tables for SQL consumers, the LLM ledger, and per-stage work in progress.
-- {embed_dim} is replaced by BLOGQA_EMBED_DIM when the migration is applied (DDL takes no
-- bind parameters); the value is recorded in blogqa.settings and checked on every start.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE blogqa.settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO blogqa.settings (key, value) VALUES ('embed_dim', '{embed_dim}');

CREATE TABLE blogqa.documents (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url             text NOT NULL UNIQUE,
    canonical_url   text,
    title           text,
    author          text,
    published       date,
    site_name       text,
    language        text,
    text            text NOT NULL,
    word_count      integer NOT NULL,
    content_hash    text NOT NULL,
    etag            text,
    last_modified   text,
    fetched_at      timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX documents_site_idx ON blogqa.documents (site_name);

CREATE TABLE blogqa.summaries (
    document_id     bigint PRIMARY KEY REFERENCES blogqa.documents (id) ON DELETE CASCADE,
    summary         text NOT NULL,
    model           text NOT NULL,
    prompt_version  text NOT NULL,
    content_hash    text NOT NULL,
    embed_model     text NOT NULL,
    embedding       vector({embed_dim}) NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE blogqa.questions (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    document_id     bigint NOT NULL REFERENCES blogqa.documents (id) ON DELETE CASCADE,
    position        smallint NOT NULL,
    question        text NOT NULL,
    answer          text NOT NULL,
    embedding       vector({embed_dim}) NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (document_id, position)
);

CREATE TABLE blogqa.chunks (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    document_id     bigint NOT NULL REFERENCES blogqa.documents (id) ON DELETE CASCADE,
    position        integer NOT NULL,
    text            text NOT NULL,
    tokens          integer NOT NULL,
    embedding       vector({embed_dim}) NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (document_id, position)
);

CREATE INDEX summaries_embedding_idx ON blogqa.summaries USING hnsw (embedding vector_cosine_ops);
CREATE INDEX questions_embedding_idx ON blogqa.questions USING hnsw (embedding vector_cosine_ops);
CREATE INDEX chunks_embedding_idx ON blogqa.chunks USING hnsw (embedding vector_cosine_ops);

-- One row per model call (chat or embeddings), kept when documents are replaced.
CREATE TABLE blogqa.llm_usage (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue_id            bigint REFERENCES blogqa.url_queue (id) ON DELETE SET NULL,
    url                 text,
    stage               text NOT NULL,
    provider            text NOT NULL,
    model               text NOT NULL,
    prompt_tokens       integer NOT NULL DEFAULT 0,
    completion_tokens   integer NOT NULL DEFAULT 0,
    inputs              integer NOT NULL DEFAULT 1,
    latency_ms          integer NOT NULL,
    cost_usd            numeric(12, 6),
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX llm_usage_created_idx ON blogqa.llm_usage (created_at);

-- Results between stages of one claim (XCom carries ids only). A row belongs to the lease
-- that wrote it: a later claim of the URL ignores it, and its crawl replaces it. The load
-- deletes it; a row queued for a retry keeps it; a quarantined row keeps it until a reviewer
-- acts; a failure that ends the row, a cancel, a redrive and a reviewer's requeue or drop
-- delete it (the queue's states: migration 001).
CREATE TABLE blogqa.work_items (
    queue_id        bigint PRIMARY KEY REFERENCES blogqa.url_queue (id) ON DELETE CASCADE,
    lease_token     uuid NOT NULL,
    page            jsonb,
    unchanged       boolean NOT NULL DEFAULT false,
    llm_result      jsonb,
    chunks          jsonb,
    vectors         bytea,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Each document with its summary and questions, for analysts.
CREATE VIEW blogqa.document_qa AS
SELECT d.id AS document_id,
       d.url,
       d.title,
       d.site_name,
       d.published,
       s.summary,
       s.model,
       coalesce(
           jsonb_agg(jsonb_build_object('question', q.question, 'answer', q.answer)
                     ORDER BY q.position) FILTER (WHERE q.id IS NOT NULL),
           '[]'::jsonb) AS questions
FROM blogqa.documents d
LEFT JOIN blogqa.summaries s ON s.document_id = d.id
LEFT JOIN blogqa.questions q ON q.document_id = d.id
GROUP BY d.id, s.summary, s.model;
