"""How many tokens an example costs: counted with a real tokenizer where one is at hand
offline, estimated by script where none is.

A token count gates examples (``--max-tokens``), sizes a training run and prices an API
fine-tune, so a build says in its manifest how the counts were made.  The choices, in
the order a build tries them when ``--tokenizer`` is not given:

- ``tiktoken:o200k_base`` when its file is in tiktoken's cache (the encoding of every
  model OpenAI fine-tunes today but gpt-3.5-turbo).  Only the cache: a build never
  downloads, so it behaves the same offline and on a machine that has never seen the
  encoding.
- the estimate by script (:func:`text_tokens`).

``--tokenizer`` also takes a local model directory (the student's own tokenizer and chat
template, what ``distill`` passes for a local student), ``tiktoken:NAME`` (any encoding
tiktoken knows, including offline plugin encodings), a model name tiktoken knows
(``gpt-4o-mini``) or ``estimate``.
"""

from __future__ import annotations

import contextlib
import math
import re
import string
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from distillery.core.errors import DistilleryError
from distillery.core.shapes import message_text

Counter = Callable[[Mapping[str, Any]], int]

ESTIMATE = "estimate"
DEFAULT_ENCODING = "o200k_base"

# Tokens by script, from how GPT-family tokenizers (o200k, cl100k) cut text: plain
# words about 4.4 characters a token (spaces included), punctuation about 0.55 of a
# token a character (pairs such as ``":`` merge), digits in threes, a CJK character or
# full-width form about 0.8, other scripts about one token per 3 characters.  That
# gives English ~4.4 characters a token, JSON ~2.5, Chinese or Japanese ~1.25; the
# usual rule of four characters a token counts CJK at a third and JSON at a half.
# Counted with str.translate and one regex, all in C: a build estimates millions.
_CJK_CHAR = re.compile(
    "[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]"
)
_NO_PUNCT = {ord(c): None for c in string.punctuation}
_NO_DIGITS = {ord(c): None for c in string.digits}
ESTIMATE_METHOD = "estimate by script (words, punctuation, digits, CJK, other scripts)"


def text_tokens(text: str) -> int:
    """Tokens a text costs, estimated by script (see the constants above)."""
    size = len(text)
    if not size:
        return 0
    punct = size - len(text.translate(_NO_PUNCT))
    digits = size - len(text.translate(_NO_DIGITS))
    cjk = other = 0
    if not text.isascii():
        cjk = len(_CJK_CHAR.findall(text))
        other = size - len(text.encode("ascii", "ignore")) - cjk
    plain = size - punct - digits - cjk - other
    return math.ceil(plain / 4.4 + punct * 0.55 + digits / 2.5 + cjk * 0.8 + other / 3)


def framed(example: Mapping[str, Any], count_text: Callable[[str], int]) -> int:
    """An example's tokens with OpenAI's framing: three a message and three to prime the
    reply; tool calls by name and arguments, tool definitions by their JSON.  For limits
    and budgets, not billing."""
    total = 3
    for message in example.get("messages") or ():
        total += 3 + count_text(message_text(message))
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            total += 3 + count_text(f"{function.get('name', '')} {function.get('arguments', '')}")
    if example.get("tools"):
        total += count_text(orjson.dumps(example["tools"]).decode())
    return total


def estimate_tokens(example: Mapping[str, Any]) -> int:
    """Tokens an example costs, estimated without a tokenizer (see :func:`text_tokens`)."""
    return framed(example, text_tokens)


def resolve(spec: str | None) -> str:
    """What a build will count with, decided once (before any worker starts) so that the
    workers and the manifest agree: the spec as given, or for none the cached default
    encoding when there is one, else the estimate."""
    if spec is not None:
        return spec
    return f"tiktoken:{DEFAULT_ENCODING}" if _tiktoken(DEFAULT_ENCODING) else ESTIMATE


def method(spec: str | None) -> str:
    """The manifest's words for how counts made with ``resolve(spec)`` were made."""
    spec = resolve(spec)
    if spec == ESTIMATE:
        return ESTIMATE_METHOD
    if spec.startswith("tiktoken:"):
        return f"counted with tiktoken's {spec.removeprefix('tiktoken:')} encoding"
    if Path(spec).is_dir():
        return f"counted with the tokenizer at {spec}"
    return f"counted with tiktoken's {_encoding_for_model(spec)} encoding (for {spec})"


def counter(spec: str | None) -> Counter:
    """A counter for ``resolve(spec)``; a spec that cannot be honoured is a clear error."""
    spec = resolve(spec)
    if spec == ESTIMATE:
        return estimate_tokens
    if Path(spec).is_dir():
        return _local_counter(spec)
    name = spec.removeprefix("tiktoken:") if spec.startswith("tiktoken:") else None
    name = name or _encoding_for_model(spec)
    encoding = _tiktoken(name)
    if encoding is None:
        raise DistilleryError(
            f"tiktoken's {name} encoding is not on this machine. "
            'Fetch it once where there is internet (python -c "import tiktoken; '
            f"tiktoken.get_encoding('{name}')\") and point "
            "TIKTOKEN_CACHE_DIR at that cache, or use --tokenizer estimate."
        )
    encode = encoding.encode_ordinary  # text that looks like <|endoftext|> is text
    return lambda example: framed(example, lambda text: len(encode(text)))


def _encoding_for_model(model: str) -> str:
    try:
        import tiktoken
    except ImportError:
        raise DistilleryError(
            f"--tokenizer {model}: not a directory, and naming a model needs tiktoken "
            "(pip install tiktoken)."
        ) from None
    try:
        return tiktoken.encoding_name_for_model(model)
    except KeyError:
        raise DistilleryError(
            f"--tokenizer {model}: neither a directory nor a model tiktoken knows. Give a "
            "model directory, tiktoken:ENCODING, an OpenAI model name or 'estimate'."
        ) from None


_OFFLINE = threading.Lock()


class _NotCached(Exception):
    pass


@contextlib.contextmanager
def _cache_only() -> Iterator[None]:
    """tiktoken reads an encoding's file from its cache, else downloads it; within this
    block a download is refused instead.  tiktoken has no switch for this, so its one
    download function is swapped for the duration, under a lock."""
    import tiktoken.load as load

    original = load.read_file

    def local_only(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise _NotCached(blobpath)
        return original(blobpath)

    with _OFFLINE:
        load.read_file = local_only
        try:
            yield
        finally:
            load.read_file = original


def _tiktoken(name: str) -> Any:
    """tiktoken's encoding ``name`` if it can be had without the network, else None."""
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        with _cache_only():
            return tiktoken.get_encoding(name)
    except (_NotCached, ValueError, OSError):  # not cached, unknown name, a bad cache file
        return None


def _local_counter(directory: str) -> Counter:
    """The student's own tokenizer, through its chat template when it has one."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DistilleryError(
            "--tokenizer needs transformers: pip install 'distillery[train]'"
        ) from None
    try:
        loaded = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DistilleryError(
            f"Cannot load a tokenizer from {directory}: {str(exc).splitlines()[0]} "
            "Point --tokenizer at a model directory that holds tokenizer files."
        ) from None

    def count(example: Mapping[str, Any]) -> int:
        messages = [
            {"role": m.get("role"), "content": _counted_text(m)} for m in example["messages"]
        ]
        if loaded.chat_template:
            with contextlib.suppress(Exception):  # a template that refuses these roles
                ids = loaded.apply_chat_template(messages, tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
                return len(ids)
        return 3 + sum(
            3 + len(loaded.encode(m["content"], add_special_tokens=False)) for m in messages
        )

    return count


def _counted_text(message: Mapping[str, Any]) -> str:
    text = message_text(message)
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        text += f"\n{function.get('name', '')} {function.get('arguments', '')}"
    return text
