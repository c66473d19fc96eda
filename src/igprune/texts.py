"""Calibration texts: a passage, or a request whose response alone is scored.

A deployment's inputs are often requests: a prompt the model reads and a response it writes. The router sees
only the prompt, and what a mask should keep is the model's skill at the response. So a `Request` is clustered
by its prompt (as it will be routed) and scored on its response tokens given the prompt (as a log-likelihood
task scores a reference answer); a plain string is clustered and scored whole.

    texts = ["A passage.", Request("Write a function that adds two numbers.\n", "def add(a, b):\n    return a + b")]
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from igprune.files import IGPruneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Request(NamedTuple):
    prompt: str
    response: str


Text = str | Request


def routed(text: Text) -> str:
    """What the router sees of a text: a request's prompt, or the whole passage."""
    return text.prompt if isinstance(text, Request) else text


def tokens(tokenizer: PreTrainedTokenizerBase, text: Text,
           add_special_tokens: bool = True) -> tuple[list[int], list[bool]]:
    """A text's token ids, and per token whether a loss scores it: all of a passage, only a request's response
    (its prompt and response tokenized apart, as a log-likelihood task tokenizes context and continuation)."""
    if not isinstance(text, Request):
        ids = tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        return ids, [True] * len(ids)
    read = tokenizer(text.prompt, add_special_tokens=add_special_tokens).input_ids
    written = tokenizer(text.response, add_special_tokens=False).input_ids
    return read + written, [False] * len(read) + [True] * len(written)


def clean_texts(texts: Sequence[Text]) -> list[Text]:
    """Drop empty calibration texts (a request with an empty prompt or response) with a warning; none left is an
    error."""
    kept = [t for t in texts if (isinstance(t, Request) and t.prompt.strip() and t.response.strip())
            or (isinstance(t, str) and t.strip())]
    if len(kept) < len(texts):
        warnings.warn(f"dropped {len(texts) - len(kept)} empty calibration text(s)", stacklevel=3)
    if not kept:
        raise IGPruneError("no calibration texts: give at least one non-empty text")
    return kept


def digest(texts: Sequence[Text]) -> str:
    """sha256 of the texts, a request's prompt and response kept apart: whether a refit had the same ones."""
    parts = [f"{t.prompt}\x01{t.response}" if isinstance(t, Request) else t for t in texts]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()
