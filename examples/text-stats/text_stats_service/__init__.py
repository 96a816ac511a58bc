"""A trivial but real ml_service plugin: characters, words, sentences and alphabet of a text.

Install it next to the service (`pip install -e examples/text-stats`) and run it by name:
`python -m ml_service.runner text-stats`.
"""

from __future__ import annotations

import re
import unicodedata

from pydantic import BaseModel, ConfigDict, Field

from ml_service.contract import InvalidInput, ModelService

_WORD = re.compile(r"\w+(?:-\w+)*")
_SENTENCE_END = re.compile(r"[.!?…]+(?:\s|$)")


class StatsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(..., description="any UTF-8 text")


class StatsResponse(BaseModel):
    model: str
    characters: int
    bytes: int
    words: int
    sentences: int
    cyrillic_share: float = Field(..., description="share of letters that are Cyrillic")
    most_common_words: list[tuple[str, int]]


class TextStatsService(ModelService):
    name = "text-stats"
    version = "0.1.0"
    description = "character, word and sentence counts of a text (example plugin)"
    request_model = StatsRequest
    response_model = StatsResponse

    def preprocess(self, request: StatsRequest) -> str:
        if not request.text.strip():
            raise InvalidInput("text must not be empty")
        return unicodedata.normalize("NFC", request.text)

    def predict(self, batch: list[str]) -> list[dict]:
        return [self._stats(text) for text in batch]

    def postprocess(self, output: dict, request: StatsRequest) -> StatsResponse:
        return StatsResponse(model=self.model_id, **output)

    @staticmethod
    def _stats(text: str) -> dict:
        words = [w.lower() for w in _WORD.findall(text)]
        letters = [c for c in text if c.isalpha()]
        cyrillic = sum("CYRILLIC" in unicodedata.name(c, "") for c in letters)
        counts: dict[str, int] = {}
        for w in words:
            counts[w] = counts.get(w, 0) + 1
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        return {
            "characters": len(text),
            "bytes": len(text.encode("utf-8")),
            "words": len(words),
            "sentences": max(len(_SENTENCE_END.findall(text)), 1 if words else 0),
            "cyrillic_share": round(cyrillic / len(letters), 4) if letters else 0.0,
            "most_common_words": top,
        }
