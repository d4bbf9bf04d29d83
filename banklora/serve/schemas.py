"""The OpenAI request and response shapes banklora serves, and its error object.

Ranges are checked here (pydantic) and by `check_*` below, each failure an ApiError with the
`param` it concerns, as vLLM and OpenAI answer: 400 {"error": {"message", "type", "param", "code"}}.
Fields OpenAI clients send that banklora does not act on (user, logprobs=false, ...) are accepted
and ignored.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP status plus the error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="A served model: the base's name or an adapter's (GET /v1/models).")
    max_tokens: Optional[int] = Field(None, ge=1, description="Longest answer in tokens; default: 256, or what the context has left.")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 = greedy (the same answer every time); default 1.")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="Nucleus sampling threshold; default 1.")
    stop: Union[str, list[str], None] = Field(None, description="Up to 4 strings; the answer ends before the first one.")
    seed: Optional[int] = Field(None, description="Sampling seed: the same seed and request give the same answer.")
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2, description="Lowers each token's logit by this x the times it is already in the answer; default 0 (off).")
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2, description="Lowers a token's logit by this once it is in the answer; default 0 (off).")
    repetition_penalty: Optional[float] = Field(None, gt=0, allow_inf_nan=False, description=(
        "vLLM's extra parameter: tokens of the prompt or the answer have their logit divided by this (multiplied when negative); 1 = off; default 1.15, which curbs a small model's loops (README, Turn tokens)."))
    n: int = Field(1, description="Answers per request; only 1.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, f"stop takes at most 4 strings (got {len(stops)})", param="stop")
        if any(s == "" for s in stops):
            raise ApiError(400, "stop strings must not be empty", param="stop")
        return tuple(stops)

    def check(self) -> None:
        if self.n != 1:
            raise ApiError(400, f"n must be 1: banklora returns one answer per request (got {self.n})", param="n")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
        self.stops()


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="The newer name of max_tokens; wins when both are given.")

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]] = Field(description="Raw text (Gemma's control tokens are read as such); one prompt per request.")
    echo: bool = False

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ApiError(400, f"prompt takes one string per request (got {len(self.prompt)})", param="prompt")
            return self.prompt[0]
        return self.prompt

    def limit(self) -> int | None:
        return self.max_tokens

    def check(self) -> None:
        super().check()
        if self.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if not self.text():
            raise ApiError(400, "prompt must not be empty", param="prompt")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatAnswer(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatAnswer
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "banklora"
    root: str
    parent: Optional[str] = None  # the base, for an adapter (as vLLM lists LoRA modules)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in (
    (400, "Bad request: the message and `param` say what to change"),
    (401, "Missing or wrong API key"),
    (404, "Unknown model"),
    (429, "Too many requests waiting; retry after the Retry-After header's seconds"),
    (500, "The server failed"),
)}
