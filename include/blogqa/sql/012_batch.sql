-- 012: summaries through the OpenAI Batch API (BLOGQA_LLM_MODE=batch, blogqa.batch).
--
-- The batch a work item's page was submitted in. Set when the batch is created, under the
-- row's lease; a retried task finds it and waits for that batch instead of submitting (and
-- paying for) the page again. The row's work item goes away with the row's next status, as
-- every work item does.
ALTER TABLE blogqa.work_items ADD COLUMN batch_id text;
