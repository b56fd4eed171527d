"""The OpenAI wire format, in one place: a `Request` becomes a request body, and a response body
becomes a `Reply`. The API actors send these bodies; the batch backends write them as request
lines and read their output lines with the same readers.

A body is read into `ChatBody` or `TextBody`: only the fields a result needs, validated from the
raw bytes. The `openai` client's own typed `ChatCompletion` of a reply with logprobs costs an
actor's event loop several times more (a bare loop of 64 requests in flight at 1 s reached 0.88
of C/L with it, 0.985 without).
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ValidationError

from alpagasus_ray.llm.task import Reply, Request

CHAT_PATH, COMPLETION_PATH = "/chat/completions", "/completions"


def path(request: Request) -> str:
    """The endpoint a request goes to, under the API's base URL (`/v1`)."""
    return CHAT_PATH if request.messages is not None else COMPLETION_PATH


def body(request: Request, model: str, temperature: float, extra: dict | None = None) -> dict:
    """The JSON body of one request: chat messages or a plain prompt, the sampling settings, the
    logprobs asked for, the structured-output constraint (vLLM's `structured_outputs`), then the
    endpoint's `extra_body` fields.

    >>> body(Request(prompt="Hi", max_tokens=3), "m", 0.0)
    {'model': 'm', 'prompt': 'Hi', 'max_tokens': 3, 'temperature': 0.0}
    >>> body(Request(messages=[{"role": "user", "content": "Hi"}], top_logprobs=5, constraint={"choice": ["1"]}), "m", 0.7)["structured_outputs"]
    {'choice': ['1']}
    """
    if request.messages is not None:
        out = {"model": model, "messages": request.messages}
    else:
        out = {"model": model, "prompt": request.prompt}
    out.update(max_tokens=request.max_tokens, temperature=temperature)
    if request.top_logprobs:
        if request.messages is not None:
            out.update(logprobs=True, top_logprobs=request.top_logprobs)
        else:
            out["logprobs"] = request.top_logprobs
    if request.constraint:
        out["structured_outputs"] = request.constraint
    out.update(extra or {})
    return out


class _TopLogprob(BaseModel):
    token: str
    logprob: float


class _TokenLogprob(_TopLogprob):
    top_logprobs: list[_TopLogprob] = []


class _Logprobs(BaseModel):
    content: list[_TokenLogprob] | None = None


class _Message(BaseModel):
    content: str | None = None


class _ChatChoice(BaseModel):
    message: _Message
    logprobs: _Logprobs | None = None
    finish_reason: str | None = None


class _TextChoice(BaseModel):
    text: str
    finish_reason: str | None = None


class _Usage(BaseModel):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class ChatBody(BaseModel):
    """The part of a chat completion's body that a result is read from, with the attribute names
    of `openai`'s `ChatCompletion`. Only these fields are validated (not, say, each logprob's list
    of bytes); a body without them is an unreadable reply. Also a line of a Batch API output file."""

    choices: list[_ChatChoice]
    usage: _Usage | None = None


class TextBody(BaseModel):
    """The same for a plain completion (`/v1/completions`)."""

    choices: list[_TextChoice]
    usage: _Usage | None = None


def parse(data: bytes | dict, request_path: str) -> ChatBody | TextBody:
    """The body of a reply to a request sent to `request_path`, from raw bytes or parsed JSON.

    Raises:
        ValidationError: not JSON, or a field a result is read from is missing.
    """
    model = ChatBody if request_path == CHAT_PATH else TextBody
    return model.model_validate_json(data) if isinstance(data, (bytes, str)) else model.model_validate(data)


def body_problem(error: ValidationError) -> str:
    """What is wrong with a body, in a few words: the first problem and how many there are.

    >>> try:
    ...     ChatBody.model_validate_json(b'{"choices": [{}]}')
    ... except ValidationError as e:
    ...     body_problem(e)
    'choices.0.message: Field required'
    """
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{where + ': ' if where else ''}{first['msg']}{more}"


def reply(completion: ChatBody | TextBody) -> Reply:
    """The `Reply` of a completion that has choices: its text, the top logprobs per token (the
    chosen token first) and its finish reason."""
    choice = completion.choices[0]
    if isinstance(choice, _TextChoice):
        return Reply(choice.text, [], choice.finish_reason)
    positions = []
    content = choice.logprobs.content if choice.logprobs else None
    for entry in content or []:
        alternatives = [(t.token, t.logprob) for t in entry.top_logprobs if t.token != entry.token]
        positions.append([(entry.token, entry.logprob), *alternatives])
    return Reply(choice.message.content or "", positions, choice.finish_reason)


def usage(completion: ChatBody | TextBody) -> tuple[int, int]:
    """(prompt tokens, completion tokens) of a reply; zeros when it says none."""
    if completion.usage is None:
        return 0, 0
    return completion.usage.prompt_tokens or 0, completion.usage.completion_tokens or 0


def retry_after_seconds(headers) -> float | None:
    """Seconds a server asked us to wait, from `retry-after-ms` or a numeric `retry-after`.

    >>> retry_after_seconds({"retry-after": "2"}), retry_after_seconds({"retry-after-ms": "250"})
    (2.0, 0.25)
    >>> retry_after_seconds({}) is None
    True
    """
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return float(value) / scale
        except ValueError:
            continue  # an HTTP date: the client's own retry still honours it
    return None


def quota_exhausted(body: bytes) -> bool:
    """Whether an error body says the account's quota is used up (OpenAI answers it with a 429, like
    a rate limit, but waiting does not help).

    >>> quota_exhausted(b'{"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}}')
    True
    >>> quota_exhausted(b'{"error": {"code": "rate_limit_exceeded"}}'), quota_exhausted(b"not json")
    (False, False)
    """
    try:
        error = json.loads(body).get("error") or {}
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and "insufficient_quota" in (error.get("code"), error.get("type"))


def describe_error(error: Exception) -> str:
    """A one-line description of a failed request; never includes request headers (the key)."""
    status = getattr(error, "status_code", None)
    message = str(getattr(error, "message", None) or error).splitlines()[0][:300]
    return f"{type(error).__name__}{f' {status}' if status else ''}: {message}"
