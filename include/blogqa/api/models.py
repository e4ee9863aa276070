"""Request and response models of the results API (they are its OpenAPI schema)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_LIMIT = 100


class ErrorBody(BaseModel):
    detail: str | list[Any] = Field(description="what went wrong (no internals)")


class Health(BaseModel):
    status: str = Field(
        description="`ok`, or `unavailable` (503) when the database is unreachable or its"
        " schema is not ready"
    )
    database: bool = Field(description="the database answered")
    schema_status: str | None = Field(
        None,
        description="`ready`; `missing` (never initialised), `behind` (older than this API) or"
        " `mismatch` (a table or column missing although the version is current): run"
        " `blogqa init`; null when the database is unreachable",
    )
    schema_version: int | None = Field(None, description="newest migration applied")
    schema_expected_version: int | None = Field(None, description="newest migration this API ships")
    queue_depth: int | None = Field(None, description="rows queued or processing")
    detail: str | None = Field(None, description="what is wrong and what to do, when not ok")


class DocumentSummary(BaseModel):
    summary: str
    model: str = Field(description="chat model; `local-…` for the offline provider")
    prompt_version: str
    embed_model: str
    created_at: datetime


class QuestionItem(BaseModel):
    id: int
    position: int
    question: str
    answer: str


class DocumentItem(BaseModel):
    id: int
    url: str
    title: str | None
    author: str | None
    published: date | None
    site_name: str | None
    language: str | None
    word_count: int
    fetched_at: datetime
    question_count: int


class DocumentList(BaseModel):
    total: int = Field(description="rows matching the filters (before limit/offset)")
    limit: int
    offset: int
    items: list[DocumentItem]


class DocumentDetail(DocumentItem):
    canonical_url: str | None
    content_hash: str
    created_at: datetime
    updated_at: datetime
    chunk_count: int
    summary: DocumentSummary | None
    questions: list[QuestionItem]
    text: str | None = Field(None, description="article text, with include_text=true")


class QuestionDetail(QuestionItem):
    document_id: int
    url: str
    title: str | None
    created_at: datetime


class SimilarRequest(BaseModel):
    """Exactly one of `text` (embedded with the configured model) or `url` (a processed
    document: its summary embedding is the query, and it is left out of the results)."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, min_length=1, max_length=20_000)
    url: str | None = Field(None, min_length=1, max_length=2048)
    k: int = Field(10, ge=1, le=MAX_LIMIT)
    include_questions: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> SimilarRequest:
        if (self.text is None) == (self.url is None):
            raise ValueError("give exactly one of 'text' or 'url'")
        return self


class SimilarResult(BaseModel):
    document_id: int
    url: str
    title: str | None
    score: float = Field(description="cosine similarity of the best-matching chunk (1 = same)")
    passage: str = Field(description="that chunk's text")
    questions: list[QuestionItem] | None = None


class SimilarResponse(BaseModel):
    query_url: str | None = Field(None, description="normalized URL, for a url query")
    embed_model: str
    results: list[SimilarResult]


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=3, max_length=2000)
    k: int = Field(5, ge=1, le=20, description="chunks retrieved and given to the model")


class Source(BaseModel):
    document_id: int
    chunk_id: int
    url: str
    title: str | None
    text: str
    score: float


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class AskResponse(BaseModel):
    question: str
    answer: str
    model: str
    provider: str = Field(description="`openai` or `local` (offline extractive, not an LLM)")
    sources: list[Source]
    usage: Usage


class JobStats(BaseModel):
    counts: dict[str, int]
    total: int
    oldest_queued_age_seconds: float | None
    claimable: int
    done_last_hour: int
    failed_last_hour: int = Field(description="rows that ended `dead` in the last hour")
    retries_last_hour: int = Field(description="failed attempts recorded in the last hour")
    failure_rate_last_hour: float | None = Field(
        None, description="failed / (done + failed) over the last hour"
    )
    avg_wait_seconds: float | None = Field(
        None, description="enqueued → started, rows finished in the last hour"
    )
    avg_processing_seconds: float | None = Field(
        None, description="started → finished, rows done in the last hour"
    )


class ErrorEntry(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    attempt: int | None = None
    stage: str | None = None
    error_class: str | None = Field(None, alias="class")
    message: str | None = None
    at: datetime | None = None


class JobItem(BaseModel):
    id: int
    url: str
    status: str
    priority: int
    attempts: int
    max_attempts: int
    stage: str | None = Field(description="stage of the last error (crawl, summarize, …)")
    last_error: str | None
    run_after: datetime
    enqueued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    processing_ms: int | None
    updated_at: datetime


class JobList(BaseModel):
    items: list[JobItem]


class JobDetail(JobItem):
    lease_until: datetime | None
    error_history: list[ErrorEntry]
    document_id: int | None = Field(description="the stored document for this URL, if any")


# ---------------------------------------------------------------- publisher widget (public)


class WidgetQuestion(BaseModel):
    question: str
    answer: str


class WidgetPage(BaseModel):
    """What the widget shows of one page: its title and questions, nothing else."""

    url: str = Field(description="the page's URL as stored (normalized)")
    title: str | None
    questions: list[WidgetQuestion]


class WidgetAskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048, description="the page the reader is on")
    question: str = Field(min_length=3, max_length=500)


class WidgetPassage(BaseModel):
    position: int = Field(description="the chunk's position in the page")
    text: str


class WidgetAnswer(BaseModel):
    """An answer from the page's own chunks only, with the passages it was given."""

    answer: str
    model: str
    provider: str = Field(description="`openai` or `local` (offline extractive, not an LLM)")
    passages: list[WidgetPassage]
