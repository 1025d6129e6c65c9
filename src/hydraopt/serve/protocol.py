"""The OpenAI request bodies the server accepts, and OpenAI-style error bodies.

Fields are strict (a string where a number belongs is a 400, not silently converted); unknown
fields that OpenAI clients send (``user``, ``presence_penalty``, ...) are ignored. ``model`` is the
task name. ``temperature`` defaults to 0 (greedy) rather than OpenAI's 1: a served compression
is compared with its adapters, and greedy answers are reproducible.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MAX_TOKENS = 64


class SamplingFields(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)  # one choice per request

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop if s)


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: ``prompt`` is used as is (no chat template)."""

    prompt: str = Field(min_length=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``: ``messages`` go through the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)


ErrorType = Literal["invalid_request_error", "not_found_error", "server_error"]


def error_body(
    message: str, type: ErrorType, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` as OpenAI's API returns it."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
