-- 011: keeping the outputs fresh (blogqa.reprocess, blogqa.dedupe, blogqa.sources).
--
-- Reprocessing by cause. `redo` on a queue row says which stages a claim must redo even
-- though the page may be unchanged (set by `blogqa reprocess`, cleared when the row is done).
-- `blogqa reprocess` puts done rows back (done -> queued, attempts 0, due now) with the
-- flag; a row already queued only gets it (the broader cause wins: all over summaries over
-- embeddings); a row being processed is left alone (the queue's states: migration 001):
--   NULL          the usual path: conditional GET, and only what changed is redone
--   'all'         the content may have changed: unconditional fetch, every stage
--   'summaries'   prompt or chat model changed: summarize and embed from the stored text
--                 (no fetch while the stored copy is fresh, BLOGQA_REPROCESS_FRESH_DAYS)
--   'embeddings'  embedding model changed: embed the stored summary, questions and text only
ALTER TABLE blogqa.url_queue ADD COLUMN redo text
    CHECK (redo IN ('all', 'summaries', 'embeddings'));

-- Which chat model and prompt made each question/answer row (the summary row already says).
ALTER TABLE blogqa.questions ADD COLUMN model text;
ALTER TABLE blogqa.questions ADD COLUMN prompt_version text;
UPDATE blogqa.questions q SET model = s.model, prompt_version = s.prompt_version
FROM blogqa.summaries s WHERE s.document_id = q.document_id;

-- Serves `blogqa reprocess --since/--until` (documents by first fetch).
CREATE INDEX documents_created_idx ON blogqa.documents (created_at);
-- Serves the duplicate check on declared canonical URLs.
CREATE INDEX documents_canonical_idx ON blogqa.documents (canonical_url)
    WHERE canonical_url IS NOT NULL;

-- Near-duplicate detection (blogqa.dedupe): a MinHash signature of each stored document's
-- word 3-shingles (128 values, uint32, little-endian) and its 32 LSH band keys; a new page
-- whose bands overlap a document's (GIN, `&&`) is compared signature to signature.
CREATE TABLE blogqa.document_fingerprints (
    document_id     bigint PRIMARY KEY REFERENCES blogqa.documents (id) ON DELETE CASCADE,
    content_hash    text NOT NULL,
    minhash         bytea NOT NULL,
    bands           bigint[] NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX document_fingerprints_bands_idx ON blogqa.document_fingerprints USING gin (bands);

-- Duplicates paid once: a URL whose page declared a canonical URL already stored, or whose
-- text is a near-duplicate of a stored document, is not processed further. Its queue row
-- ends `skipped` with last_stage 'dedupe' and the reason in last_error; this row links it to
-- the original (documents.url of original_url).
CREATE TABLE blogqa.duplicates (
    url             text PRIMARY KEY,
    queue_id        bigint REFERENCES blogqa.url_queue (id) ON DELETE CASCADE,
    original_url    text NOT NULL,
    reason          text NOT NULL CHECK (reason IN ('canonical', 'near_duplicate')),
    similarity      real,
    content_hash    text,
    detected_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX duplicates_original_idx ON blogqa.duplicates (original_url);

-- Discovery: feeds, sitemaps and sites polled for new or changed URLs (blogqa.sources).
--   kind       'feed' (RSS/Atom), 'sitemap' (urlset or sitemapindex), 'site' (its robots.txt
--              Sitemap: lines, its <link rel=alternate> feeds, else /sitemap.xml)
--   max_per_poll  most URLs one poll enqueues (the rest wait for the next poll)
--   etag, last_modified  of the source document itself, for a conditional GET
CREATE TABLE blogqa.sources (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url             text NOT NULL UNIQUE,
    kind            text NOT NULL CHECK (kind IN ('feed', 'sitemap', 'site')),
    max_per_poll    integer NOT NULL DEFAULT 100 CHECK (max_per_poll >= 1),
    enabled         boolean NOT NULL DEFAULT true,
    etag            text,
    last_modified   text,
    last_polled_at  timestamptz,
    last_status     text,
    last_error      text,
    last_found      integer,
    last_enqueued   integer,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- What each source listed: an entry is (re)enqueued when it is new or its lastmod changed.
CREATE TABLE blogqa.source_entries (
    source_id       bigint NOT NULL REFERENCES blogqa.sources (id) ON DELETE CASCADE,
    url             text NOT NULL,
    lastmod         text,
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    enqueued_at     timestamptz,
    PRIMARY KEY (source_id, url)
);
