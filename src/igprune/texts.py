"""Calibration texts: a passage, or a request whose response alone is scored.

A deployment's inputs are often requests: a prompt the model reads and a response it writes. The router sees
only the prompt, and what a mask should keep is the model's skill at the response. So a `Request` is clustered
by its prompt (as it will be routed) and scored on its response tokens given the prompt (as a log-likelihood
task scores a reference answer); a plain string is clustered and scored whole.

    texts = ["A passage.", Request("Write a function that adds two numbers.\n", "def add(a, b):\n    return a + b")]

A chat whose last message is the assistant's reply is a request too (`chat_request`): the model reads the chat
template's prompt, exactly as `igprune serve` builds it, and the router sees the messages' text, as it does there.
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
    route: str | None = None  # what the router sees where it is not the prompt (a chat: its messages' text)
    templated: bool = False  # the prompt is a chat template's output: tokenized without adding special tokens


Text = str | Request
ROLES = ("system", "developer", "user", "assistant")


def routed(text: Text) -> str:
    """What the router sees of a text: a request's prompt (or its `route`), or the whole passage."""
    if isinstance(text, Request):
        return text.prompt if text.route is None else text.route
    return text


def chat_route_text(messages: Sequence[dict[str, str]]) -> str:
    """What the router sees of a chat: its messages' text, one per line (igprune serve routes a chat by it)."""
    return "\n".join(m["content"] for m in messages if m["content"].strip())


def chat_request(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> Request:
    """A chat whose last message is the assistant's reply, as a Request: the chat template over the messages before
    it (with the generation prompt) is read, the reply is scored, and the earlier messages' text is routed."""
    if not getattr(tokenizer, "chat_template", None):
        raise IGPruneError('the model has no chat template; give {"prompt": ..., "response": ...} lines instead')
    *asked, reply = messages
    return Request(chat_prompt(tokenizer, asked), reply["content"], chat_route_text(asked), templated=True)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> str:
    """The text a chat model reads before its reply: the chat template over the messages, with the generation
    prompt; tokenize it without adding special tokens (the template has them)."""
    try:
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    except Exception as err:  # a template may refuse an order of roles
        raise IGPruneError(f"the chat template refused these messages: {err}") from None


def tokens(tokenizer: PreTrainedTokenizerBase, text: Text,
           add_special_tokens: bool = True) -> tuple[list[int], list[bool]]:
    """A text's token ids, and per token whether a loss scores it: all of a passage, only a request's response
    (its prompt and response tokenized apart, as a log-likelihood task tokenizes context and continuation)."""
    if not isinstance(text, Request):
        ids = tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        return ids, [True] * len(ids)
    read = tokenizer(text.prompt, add_special_tokens=add_special_tokens and not text.templated).input_ids
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
    parts = ["\x01".join(map(str, [f for f in t if f is not None])) if isinstance(t, Request) else t for t in texts]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()
