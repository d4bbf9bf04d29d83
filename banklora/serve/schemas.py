"""The OpenAI request and response shapes banklora serves, and its error object.

Ranges are checked here (pydantic) and by `check_*` below, each failure an ApiError with the
`param` it concerns, as vLLM and OpenAI answer: 400 {"error": {"message", "type", "param", "code"}}.
Fields OpenAI clients send that change nothing (user, logprobs=false, ...) are accepted and ignored;
those that would change the answer and are not supported yet (logprobs, tools, a JSON
response_format) are refused with 400 and their param, never silently ignored.
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


INT64 = 2**63  # seeds: what a 64-bit generator takes, as vLLM bounds them


def check_text(text: str, param: str) -> str:
    """Text a tokenizer can read: a lone UTF-16 surrogate (JSON allows "\\ud800") is not a
    character, and would fail deep in the tokenizer as a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{param}: character {exc.start} is a lone UTF-16 surrogate ({text[exc.start]!a}), not text; "
                            "send valid Unicode (a surrogate pair, or the character itself)", param=param) from exc
    return text


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    """An image, audio or file part: parsed so that the answer can say it is not supported."""
    model_config = ConfigDict(extra="allow")
    type: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Union[TextPart, OtherPart]]]

    def text(self, param: str = "messages") -> str:
        if isinstance(self.content, str):
            return check_text(self.content, f"{param}.content")
        for i, part in enumerate(self.content):
            if not isinstance(part, TextPart):
                raise ApiError(400, f"{param}.content[{i}]: {part.type} parts are not supported: banklora serves a text model; "
                                    "send the content as text", param=f"{param}.content[{i}].type")
        return "".join(check_text(part.text, f"{param}.content[{i}].text") for i, part in enumerate(self.content))


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="A served model: the base's name or an adapter's (GET /v1/models).")
    max_tokens: Optional[int] = Field(None, ge=1, description="Longest answer in tokens; default: 256, or what the context has left.")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 = greedy (the same answer every time); default 1.")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="Nucleus sampling threshold; default 1.")
    stop: Union[str, list[str], None] = Field(None, description="Up to 4 strings; the answer ends before the first one.")
    seed: Optional[int] = Field(None, ge=-INT64, lt=INT64, description="Sampling seed (a 64-bit integer): the same seed and request give the same answer.")
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2, description="Lowers each token's logit by this x the times it is already in the answer; default 0 (off).")
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2, description="Lowers a token's logit by this once it is in the answer; default 0 (off).")
    repetition_penalty: Optional[float] = Field(None, gt=0, allow_inf_nan=False, description=(
        "vLLM's extra parameter: tokens of the prompt or the answer have their logit divided by this (multiplied when negative); 1 = off; default 1.15, which curbs a small model's loops (docs/training.md, Turn tokens)."))
    n: int = Field(1, description="Answers per request; only 1.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # parsed only to be refused while unsupported: a client relying on them must not get an answer that ignored them
    logprobs: Union[bool, int, None] = Field(None, description="Not supported: only null, false or 0.")
    top_logprobs: Optional[int] = Field(None, description="Not supported: only null or 0.")
    response_format: Optional[dict] = Field(None, description='Not supported beyond {"type": "text"}.')
    tools: Optional[list] = Field(None, description="Not supported: only null or [].")
    tool_choice: Union[str, dict, None] = Field(None, description='Not supported beyond "none".')

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
        for param, given, off in (("logprobs", self.logprobs, (None, False, 0)), ("top_logprobs", self.top_logprobs, (None, 0)),
                                  ("tools", self.tools, (None, [])), ("tool_choice", self.tool_choice, (None, "none"))):
            if given not in off:
                raise ApiError(400, f"{param} is not supported by banklora serve yet; leave it out", param=param)
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise ApiError(400, f"response_format {self.response_format.get('type')!r} is not supported: answers are free text; leave it out",
                           param="response_format")
        for i, stop in enumerate(self.stops()):
            check_text(stop, f"stop[{i}]" if isinstance(self.stop, list) else "stop")


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
        if not check_text(self.text(), "prompt"):
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
