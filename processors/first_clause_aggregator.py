"""Sentence aggregation for TTS that lets a reply's first clause go early."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from pipecat.utils.text.base_text_aggregator import Aggregation, TextType
from pipecat.utils.text.simple_text_aggregator import SimpleTextAggregator

_CLAUSE_END = re.compile(r"[,;:\u2014]\s")


class FirstClauseAggregator(SimpleTextAggregator):
    """Hands TTS the first clause of each reply instead of waiting for its first sentence.

    Synthesis time grows with the text, and the user waits for the first chunk
    only: a reply's first ``min_words``..``max_words`` words, cut at a comma or
    after ``max_words`` words, start playing sooner. Later text goes by sentence,
    which keeps the prosody natural.
    """

    def __init__(self, *, min_words: int = 2, max_words: int = 4, **kwargs):
        """Initialize the aggregator.

        Args:
            min_words: A clause shorter than this is not worth a chunk of its own.
            max_words: Without a comma, cut the first chunk after this many words.
            **kwargs: Passed to ``SimpleTextAggregator``.
        """
        super().__init__(**kwargs)
        self._min_words = min_words
        self._max_words = max_words
        self._first = True

    async def aggregate(self, text: str) -> AsyncIterator[Aggregation]:
        async for aggregation in super().aggregate(text):
            self._first = False
            yield aggregation
        if self._first and (cut := self._first_cut()):
            chunk, self._text = self._text[:cut], self._text[cut:]
            self._first = False
            yield Aggregation(text=chunk.strip(), type=TextType.SENTENCE)

    def _first_cut(self) -> int | None:
        words = self._text.split()
        if len(words) < self._min_words:
            return None
        for match in _CLAUSE_END.finditer(self._text):
            if len(self._text[: match.start()].split()) >= self._min_words:
                return match.end()
        if len(words) > self._max_words:
            # Complete words only: the last one may still be growing.
            return self._text.rstrip().rfind(" ") + 1
        return None

    async def flush(self) -> Aggregation | None:
        self._first = True
        return await super().flush()

    async def handle_interruption(self):
        self._first = True
        await super().handle_interruption()

    async def reset(self):
        self._first = True
        await super().reset()
