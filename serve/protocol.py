"""The request bodies of the OpenAI-compatible endpoints, and the shapes of the answers.

Only what the server does is accepted: a field of the OpenAI API that it does not implement
(``logprobs``, ``echo``, penalties, tools...) is refused with 400 when set to anything but its
neutral value, never silently ignored. Unknown fields are ignored, as OpenAI's own API does.
Per-request routing comes in the extra field ``atmoe``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_N = 8
MAX_STOP = 4
MAX_PROMPTS = 32

StopString = Annotated[str, Field(max_length=256)]
Weight = Annotated[float, Field(ge=0.0, strict=True)]  # a JSON number >= 0 (not "1", not NaN)


def unsupported(default: Any, description: str) -> Any:
    """A field of the OpenAI API that the server does not implement: the schema admits only its
    neutral value; any other is refused with 400 and the reason (the validators below)."""
    return Field(default=default, description=description, json_schema_extra={"enum": [default]})


class AtmoeOptions(BaseModel):
    """The ``atmoe`` extension of a request."""

    model_config = ConfigDict(extra="forbid")

    force: dict[str, Weight] | None = Field(
        default=None,
        description="Expert weights by name for this request, instead of the router's (as --force NAME=W).",
        examples=[{"count": 0.4, "animal": 0.3, "loud": 0.3}],
    )
    blocks: bool = Field(default=False, description="Also return the routing of every block (a heatmap's data).")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Sampling(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="A catalog reference NAME[@VERSION][:ROUTER], e.g. letters:prod.", max_length=200)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = Field(
        default=None, description=f"Up to {MAX_STOP} stop strings."
    )
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    user: str | None = Field(default=None, max_length=256)
    presence_penalty: float = unsupported(0.0, "Not supported: must be 0.")
    frequency_penalty: float = unsupported(0.0, "Not supported: must be 0.")
    logit_bias: dict[str, float] | None = unsupported(None, "Not supported: must be null.")
    ignore_eos: bool = Field(default=False, description="Go on past the end-of-sequence token (as vLLM's).")
    atmoe: AtmoeOptions | None = None

    @model_validator(mode="after")
    def _supported(self) -> _Sampling:
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported: leave them at 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def force(self) -> dict[str, Any] | None:
        return self.atmoe.force if self.atmoe is not None else None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(
        description=f"Text, or token ids; a list of up to {MAX_PROMPTS} of either answers each.",
        examples=["instruction: count animal loud input: c a b output:"],
    )
    max_tokens: int | None = Field(default=16, ge=1, description="Tokens to generate at most (default 16).")
    logprobs: int | None = unsupported(None, "Not supported: must be null.")
    echo: bool = unsupported(False, "Not supported: must be false.")
    best_of: int | None = Field(
        default=None, description="Not supported beyond 1.", json_schema_extra={"enum": [None, 1]}
    )
    suffix: str | None = unsupported(None, "Not supported: must be null.")

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
        if self.logprobs is not None:
            raise ValueError("logprobs is not supported")
        if self.echo:
            raise ValueError("echo is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported beyond 1")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as texts or id lists (a list of strings or of id lists answers each)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``: the messages go through the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(
        default=None, ge=1, description="Tokens to generate at most (default: to --max-tokens)."
    )
    max_completion_tokens: int | None = Field(default=None, ge=1, description="The newer name of max_tokens.")
    logprobs: bool = unsupported(False, "Not supported: must be false.")
    tools: list[Any] | None = unsupported(None, "Not supported: must be null.")
    response_format: dict[str, Any] | None = Field(
        default=None, description="Only {'type': 'text'}.", json_schema_extra={"enum": [None, {"type": "text"}]}
    )

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatRequest:
        if self.logprobs:
            raise ValueError("logprobs is not supported")
        if self.tools:
            raise ValueError("tools are not supported")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("response_format: only {'type': 'text'} is supported")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AtmoeAnswer(BaseModel):
    """What every answer carries: the routing (averaged over blocks) and the lineage."""

    model_config = ConfigDict(extra="allow")

    routing: dict[str, dict[str, float]] | None
    lineage: dict[str, Any]
    forced: dict[str, float] | None = None
    blocks: list[dict[str, Any]] | None = None


class CompletionChoice(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class Completion(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    atmoe: AtmoeAnswer


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    atmoe: AtmoeAnswer


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]
