"""The OpenAI request bodies `igprune serve` accepts, and its OpenAI-style errors.

Unknown fields are ignored (clients send many); fields igprune cannot honour (n > 1, logprobs, echo,
best_of, suffix) are refused with a 400 naming the field rather than silently dropped. Types are strict
("stream": "yes" is refused, not taken as true) and every range is what generation can take, so a request that
passes here cannot fail in the generation thread for its values; this is the one place requests are checked, for
any engine behind the server.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from igprune.texts import ROLES


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _utf8(text: str) -> str:
    """A lone surrogate (JSON "\\ud800") is valid JSON but no text: the tokenizer cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"holds {text[err.start]!r} at position {err.start}, which is not a character (a lone "
                         "surrogate); send valid UTF-8 text") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
# torch.Generator.manual_seed takes exactly these: int64 and uint64 values
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
STRICT = ConfigDict(extra="ignore", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class _Generation(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = STRICT

    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None

    def unsupported(self) -> str | None:
        """The first field set to something igprune does not do, if any."""
        if self.n != 1:
            return "n"
        if self.logprobs not in (None, False, 0):
            return "logprobs"
        return None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes at most 4 non-empty strings", param="stop")
        return stops


class CompletionRequest(_Generation):
    prompt: Text | list[Text]
    echo: bool = False
    best_of: int | None = None
    suffix: Text | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.best_of not in (None, 1):
            return "best_of"
        if self.suffix:
            return "suffix"
        return super().unsupported()

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise APIError(400, "prompt must be one string (a list of one is accepted)", param="prompt")
        return self.prompt[0]


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = STRICT

    role: Literal[ROLES]  # the roles a `fit --texts` chat line may have too
    content: Text | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
