"""Answer a question from retrieved chunks only: the configured chat model, or offline.

The offline provider is extractive like the rest of the local stand-in: the answer is the
sentence of the top chunks that shares the most content words with the question (ties go to
the better-ranked chunk). It is labelled with the `local-…` chat model name, never an LLM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from blogqa.config import Settings
from blogqa.llm import ModelCall, classify_openai_error, openai_client
from blogqa.text import content_words
from blogqa.tokens import split_sentences

STAGE = "ask"
ANSWER_PROMPT_VERSION = "ask-v1"
NO_ANSWER = "The stored articles do not answer this question."

ANSWER_SYSTEM_PROMPT = f"""You answer questions using only the numbered sources given.
Answer in 1-3 sentences and cite sources as [1], [2].
If the sources do not contain the answer, reply exactly: {NO_ANSWER}
Do not use outside knowledge."""


class AnswerError(RuntimeError):
    """The model endpoint could not answer (busy, unreachable, rejected the request)."""


@dataclass(frozen=True)
class Passage:
    """One retrieved chunk given to the answerer."""

    title: str | None
    url: str
    text: str
    score: float


@dataclass(frozen=True)
class Answer:
    text: str
    model: str
    provider: str
    calls: list[ModelCall]


def extractive_answer(question: str, passages: list[Passage]) -> str:
    """The sentence of `passages` sharing the most content words with the question."""
    wanted = set(content_words(question))
    best: tuple[float, float, str] | None = None
    for rank, passage in enumerate(passages):
        for sentence in split_sentences(passage.text):
            words = content_words(sentence)
            if len(sentence.split()) < 4 or not words:
                continue
            overlap = len(wanted.intersection(words))
            # more shared words first; then shorter (denser) sentences; then better chunks
            key = (overlap + overlap / (len(words) + 4), -rank, sentence)
            if best is None or key[:2] > best[:2]:
                best = key
    if best is None or best[0] == 0:
        return NO_ANSWER
    return best[2]


def sources_message(question: str, passages: list[Passage]) -> str:
    blocks = [
        f"[{i}] {p.title or p.url} ({p.url})\n{p.text}" for i, p in enumerate(passages, start=1)
    ]
    return "Sources:\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question}"


async def answer_question(
    settings: Settings, question: str, passages: list[Passage], *, client=None
) -> Answer:
    """Answer from `passages` only; the returned calls go to the llm_usage ledger.

    `client`: an AsyncOpenAI kept open by the caller and reused (the API's one per event
    loop); without it one is made for this answer and closed after it."""
    if settings.offline:
        model = settings.chat_model
        model = model if model.startswith("local") else f"local-{model}"
        started = time.perf_counter()
        text = extractive_answer(question, passages) if passages else NO_ANSWER
        latency = int((time.perf_counter() - started) * 1000)
        tokens = len(question.split()) + sum(len(p.text.split()) for p in passages)
        call = ModelCall(STAGE, "local", model, tokens, len(text.split()), latency)
        return Answer(text, model, "local", [call])
    if not passages:
        return Answer(NO_ANSWER, settings.chat_model, "openai", [])
    return await _openai_answer(settings, question, passages, client)


async def _openai_answer(
    settings: Settings, question: str, passages: list[Passage], client=None
) -> Answer:
    import openai

    owned = client is None
    if owned:
        client = openai_client(settings)
    started = time.perf_counter()
    try:
        response = await client.chat.completions.create(
            model=settings.chat_model,
            messages=[
                {"role": "system", "content": ANSWER_SYSTEM_PROMPT},
                {"role": "user", "content": sources_message(question, passages)},
            ],
            temperature=0.0,
        )
    except openai.OpenAIError as exc:
        problem = classify_openai_error(exc, STAGE)  # raises for configuration problems
        raise AnswerError(str(problem)) from exc
    finally:
        if owned:
            await client.close()
    latency = int((time.perf_counter() - started) * 1000)
    usage = response.usage
    model = response.model or settings.chat_model
    call = ModelCall(
        STAGE,
        "openai",
        model,
        usage.prompt_tokens if usage else 0,
        usage.completion_tokens if usage else 0,
        latency,
    )
    message = response.choices[0].message if response.choices else None
    text = ((message.content if message else None) or "").strip() or NO_ANSWER
    return Answer(text, model, "openai", [call])
