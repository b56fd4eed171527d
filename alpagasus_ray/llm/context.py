"""The grader's context: how many tokens a request may take, and how they are counted.

An engine says what its model holds (`Engine.context`): vLLM engines their `max_model_len`,
counted exactly with the model's own tokenizer and chat template; an API the `context_tokens` the
user gives, counted by estimate (about 4 characters a token). A request needs its prompt's
tokens plus its reply's `max_tokens`; one that needs more than the context is never sent.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from alpagasus_ray.llm.task import Request
from alpagasus_ray.rules.prompts import estimate_tokens

# Tokens a chat template adds per message (role markers), in the estimate without a tokenizer.
MESSAGE_TOKENS = 4
# Tokens a tokenizer may add to a rendered prompt besides its text (BOS and the like).
SPECIAL_TOKENS = 8


@dataclass(frozen=True)
class Context:
    """`tokens` of context, set by the endpoint's config key `key`; counted with the tokenizer
    at `tokenizer` (a model directory), or by estimate when None."""

    tokens: int
    key: str
    tokenizer: str | None = None

    @property
    def counted_by(self) -> str:
        return "the grader's tokenizer and chat template" if self.tokenizer else "an estimate of 4 characters a token"

    def too_long(self, request: Request) -> int | None:
        """The tokens `request` needs (its prompt and up to `max_tokens` of reply) when more than
        the context; None when it fits.

        >>> context = Context(20, "context_tokens")  # 40 characters: 10 tokens, and 4 for the message
        >>> context.too_long(Request(messages=[{"role": "user", "content": "x" * 40}], max_tokens=6))
        >>> context.too_long(Request(messages=[{"role": "user", "content": "x" * 40}], max_tokens=7))
        21
        """
        if request.messages is None:
            text = request.prompt or ""
            prompt = len(_tokenizer(self.tokenizer)(text)["input_ids"]) if self.tokenizer else estimate_tokens(text)
        elif not self.tokenizer:
            prompt = sum(estimate_tokens(m["content"]) + MESSAGE_TOKENS for m in request.messages)
        else:
            tokenizer = _tokenizer(self.tokenizer)
            rendered = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
            # A token is at least one byte of text: a prompt whose bytes fit needs no tokenizing.
            if len(rendered.encode("utf-8")) + SPECIAL_TOKENS + request.max_tokens <= self.tokens:
                return None
            prompt = len(tokenizer(rendered)["input_ids"])  # with special tokens: never fewer than the engine counts
        needed = prompt + request.max_tokens
        return needed if needed > self.tokens else None


def api_context(endpoint) -> Context | None:
    """An API's context: what the user says (`context_tokens`), or unknown."""
    return Context(endpoint.context_tokens, "context_tokens") if endpoint.context_tokens else None


def engine_context(endpoint) -> Context:
    """A vLLM engine's context: its `max_model_len`, counted with the model's tokenizer."""
    from alpagasus_ray.tiny_model import resolve_model

    return Context(endpoint.max_model_len, "max_model_len", resolve_model(endpoint.model))


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
