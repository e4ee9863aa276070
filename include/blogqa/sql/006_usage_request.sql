-- 006: llm_usage rows are charges, one per (model request, URL it served). A chat request
-- serves one URL; an embedding request carries inputs of several documents, and each of
-- them gets a row with its share of the request's tokens, inputs and cost (store.split_charges).
-- The rows of one request share `request_id`: a request's totals are the sums over its
-- rows, and the number of requests is count(DISTINCT request_id). Rows written before this
-- migration were one per request and get an id each (the volatile default rewrites the
-- table once); rows written without one (the API's `ask` calls) get a fresh id.
ALTER TABLE blogqa.llm_usage ADD COLUMN request_id uuid NOT NULL DEFAULT gen_random_uuid();
