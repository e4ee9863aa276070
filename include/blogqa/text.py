"""Content words: the words of an English text that carry its meaning, without stop words.

The offline stand-ins rank sentences by them (the extractive summary in blogqa.llm, the
extractive answer in blogqa.answer), and the offline embedder and the quality suite's
answer-support score drop the same stop words, so every part agrees on what a content word is.
"""

from __future__ import annotations

import re

_STOPWORD_TEXT = """a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing down during each few
    for from further had has have having he her here hers him his how i if in into is it its
    itself just like more most my no nor not now of off on once only or other our out over own
    same she should so some such than that the their them then there these they this those
    through to too under until up very was we were what when where which while who whom why
    will with would you your yours one two three many much may might must can't don't it's
    i'm you're we're they're new get got make made use used using way well even still"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")


def content_words(text: str) -> list[str]:
    """The words of `text` (letters, inner apostrophes and hyphens), lower-cased, in order,
    without STOPWORDS."""
    return [w.lower() for w in _WORD.findall(text) if w.lower() not in STOPWORDS]
