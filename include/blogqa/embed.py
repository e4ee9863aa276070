"""Embeddings of summaries, questions and retrieval chunks: OpenAI-compatible or offline.

Inputs from every document of a chunk are batched into few requests (up to
BLOGQA_EMBED_BATCH_SIZE inputs each), since per-request latency, not tokens, dominates.
The offline provider hashes word unigrams and bigrams into the configured dimension: lexical
similarity only, deterministic, labelled `local-hash` in the stored model name.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import logging
import re
import time
from typing import Protocol

import numpy as np

from blogqa.config import Settings
from blogqa.limits import EndpointLimits, charging
from blogqa.llm import ModelCall, classify_openai_error, openai_client
from blogqa.text import STOPWORDS
from blogqa.tokens import tokenizer_for

log = logging.getLogger(__name__)

STAGE = "embed"
_TOKEN = re.compile(r"\w+", re.UNICODE)


class EmbeddingDimensionError(RuntimeError):
    """The endpoint returned vectors of another size than BLOGQA_EMBED_DIM."""


class Embedder(Protocol):
    provider: str
    model: str
    dim: int

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, ModelCall]: ...

    async def aclose(self) -> None: ...


def _feature(token: str, dim: int) -> tuple[int, float]:
    digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    return value % dim, 1.0 if (value >> 63) & 1 else -1.0


def hashed_embedding(text: str, dim: int) -> np.ndarray:
    """Signed feature hashing of content-word unigrams and bigrams, log-scaled counts,
    L2-normalised."""
    words = [w for w in (t.lower() for t in _TOKEN.findall(text)) if w not in STOPWORDS]
    features = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
    counts: dict[tuple[int, float], int] = {}
    for feature in features:
        key = _feature(feature, dim)
        counts[key] = counts.get(key, 0) + 1
    vector = np.zeros(dim, dtype=np.float32)
    for (index, sign), count in counts.items():
        vector[index] += sign * (1.0 + np.log(count))
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        vector[0] = 1.0  # an empty text still gets a valid (unit) vector
        return vector
    return vector / norm


class LocalEmbedder:
    provider = "local"

    def __init__(self, model: str, dim: int) -> None:
        self.model = model if model.startswith("local") else f"local-{model}"
        self.dim = dim

    async def aclose(self) -> None:
        pass

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, ModelCall]:
        started = time.perf_counter()
        matrix = np.vstack([hashed_embedding(t, self.dim) for t in texts])
        latency = int((time.perf_counter() - started) * 1000)
        tokens = sum(len(t.split()) for t in texts)
        return matrix, ModelCall(STAGE, self.provider, self.model, tokens, 0, latency, len(texts))


class OpenAIEmbedder:
    """Embeddings from an OpenAI-compatible endpoint. The client built here goes through the
    limits shared by every task on every worker (`blogqa.limits`, keyed by the endpoint and
    the embedding model); a `client` passed in (the API's) is used as is."""

    provider = "openai"

    def __init__(self, settings: Settings, client=None) -> None:
        self.model = settings.embed_model
        self.dim = settings.embed_dim
        self.limits: EndpointLimits | None = None
        if client is None:
            self.limits = EndpointLimits.for_settings(settings, self.model, STAGE)
            client = openai_client(settings, timeout=settings.embed_timeout, limits=self.limits)
        self.client = client

    async def aclose(self) -> None:
        await self.client.close()

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, ModelCall]:
        import openai

        kwargs = dimensions_kwargs(self.model, self.dim)
        charge = 0.0
        if self.limits is not None and self.limits.counts_tokens:
            tokenizer = tokenizer_for(self.model)
            charge = float(sum(tokenizer.count(text) for text in texts))
        started = time.perf_counter()
        try:
            # base64 float32 is a third of the bytes of JSON floats and decodes without
            # building a Python float per number (the client's own default makes lists).
            with charging(charge):
                response = await self.client.embeddings.create(
                    model=self.model, input=texts, encoding_format="base64", **kwargs
                )
        except openai.OpenAIError as exc:
            raise classify_openai_error(exc, STAGE) from exc
        latency = int((time.perf_counter() - started) * 1000)
        rows = sorted(response.data, key=lambda d: d.index)
        matrix = np.asarray([_vector(row.embedding) for row in rows], dtype=np.float32)
        if matrix.shape != (len(texts), self.dim):
            raise EmbeddingDimensionError(
                f"{self.model} returned vectors of shape {matrix.shape[1:]} for {len(texts)} "
                f"inputs; BLOGQA_EMBED_DIM={self.dim}: set it to the model's dimension "
                "(on a new database)"
            )
        usage = response.usage
        tokens = usage.prompt_tokens if usage else 0
        if self.limits is not None:
            await self.limits.settle(charge, usage.total_tokens if usage else None)
        call = ModelCall(STAGE, self.provider, self.model, tokens, 0, latency, len(texts))
        return matrix, call


def dimensions_kwargs(model: str, dim: int) -> dict:
    """`dimensions=dim` for the models that accept it (text-embedding-3-*), else nothing."""
    return {"dimensions": dim} if model.startswith("text-embedding-3") else {}


def _vector(embedding: str | list[float]) -> np.ndarray:
    """One embedding as sent: base64 float32, or a list from servers that ignore the format."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)


def embedder(settings: Settings) -> Embedder:
    if settings.offline:
        return LocalEmbedder(settings.embed_model, settings.embed_dim)
    return OpenAIEmbedder(settings)
