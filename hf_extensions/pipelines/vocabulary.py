"""The candidate vocabulary of the EAP adversary: common English words that ship with the package.

Bui et al. (2024, Sec. 4.2) search the adversarial concept among real words (3000 common English
words in the official code); this list (``vocabulary.txt``, about 1200 words in everyday
categories: people, animals, plants, food, objects, places, nature, vehicles, clothing, body,
art styles, colours, actions, qualities, time, abstract ideas) was written for this project.
Pass your own list as ``ErasureConfig(candidates=[...])`` to use a larger one.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from hf_extensions.validation import check_integer

__all__ = ["common_words"]


@lru_cache(maxsize=1)
def _words() -> tuple[str, ...]:
    text = resources.files("hf_extensions.pipelines").joinpath("vocabulary.txt").read_text("utf-8")
    seen: dict[str, None] = {}
    for line in text.splitlines():
        word = line.strip()
        if word and not word.startswith("#"):
            seen.setdefault(word, None)
    return tuple(seen)


def common_words(limit: int | None = None) -> list[str]:
    """The shipped words, de-duplicated in file order (the first ``limit`` when given)."""
    words = _words()
    if limit is not None:
        check_integer("limit", limit, low=1)
        words = words[:limit]
    return list(words)
