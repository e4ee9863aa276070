-- 013: embedding vector sets (blogqa.vector_sets, `blogqa vectors`).
--
-- A vector set is one embedding model at one dimension, applied to every summary, question
-- and chunk. The active set is what SQL users and the API read: the columns `embedding` of
-- blogqa.summaries, blogqa.questions and blogqa.chunks, `embed_model` of blogqa.summaries,
-- and the HNSW indexes `<table>_embedding_idx`. Every other set lives beside it in the same
-- rows, in columns suffixed with its id (`embedding_s2`, `embed_model_s2`, indexes
-- `<table>_embedding_s2_idx`), so a new model is embedded while the API keeps serving the
-- old one:
--   building  created by `blogqa vectors create`, filled by `blogqa vectors build`; the
--             pipeline's loads leave its columns NULL, the next build (or the switch) fills
--             them;
--   active    exactly one; `blogqa vectors switch` renames the columns and indexes of the set
--             it activates to the unsuffixed names and the old active set's to its suffix,
--             in one short transaction;
--   retired   a former active set, kept until `blogqa vectors drop` removes its columns
--             (a switch back to it is possible until then);
--   dropped   its columns are gone (also a building set given up); the row stays, so an id
--             is never reused for another model.
-- The columns of a set other than the active one are nullable; the active set's are kept
-- non-null by the check `<table>_embedding_present` (NOT NULL for set 1 until its first
-- switch).
-- While set 1 is the only set with columns, its model follows BLOGQA_EMBED_MODEL (a change
-- re-embeds in place, as before this migration). Once `blogqa vectors create` has made another
-- set (until it is dropped and set 1 is active again), the
-- pipeline checks on start that BLOGQA_EMBED_MODEL and BLOGQA_EMBED_DIM name the active set
-- (blogqa.db), so nothing writes vectors of another model or size into it.
CREATE TABLE blogqa.vector_sets (
    id              integer PRIMARY KEY CHECK (id > 0),
    -- the model as configured (BLOGQA_EMBED_MODEL); set 1's is recorded by the first start
    -- after this migration (blogqa.db.migrate), which knows the configured model
    embed_model     text,
    embed_dim       integer NOT NULL CHECK (embed_dim BETWEEN 1 AND 2000),
    state           text NOT NULL CHECK (state IN ('building', 'active', 'retired', 'dropped')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    built_at        timestamptz,  -- when a build last found every row embedded
    switched_at     timestamptz,  -- when it last became the active set
    dropped_at      timestamptz
);
CREATE UNIQUE INDEX vector_sets_one_active ON blogqa.vector_sets ((true)) WHERE state = 'active';
CREATE UNIQUE INDEX vector_sets_one_building ON blogqa.vector_sets ((true))
    WHERE state = 'building';

-- The vectors already stored are set 1.
INSERT INTO blogqa.vector_sets (id, embed_dim, state, built_at, switched_at)
SELECT 1, value::integer, 'active', now(), now() FROM blogqa.settings WHERE key = 'embed_dim';
