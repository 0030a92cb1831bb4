"""Calling candidate models for evals: bounded concurrency, retries, a cache.

Every answer is cached in the database under a hash of (the model's identity,
messages, parameters), so re-grading, adding a grader or re-running a report
never calls a model twice.  The identity is what the model is, never where it
is served (see ``Generator.identity``): a new model under an old name and port
never gets the old answers; a model whose identity cannot be told is not cached.
Retries with exponential backoff on 429 and 5xx (honouring ``Retry-After``) are
the openai SDK's own; timeouts are per request.

Eval requests carry ``X-Distillery-Tag-distillery_eval: 1``: through a
Distillery proxy that becomes a tag, and dataset builds leave such traffic out.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Any, cast

import openai
import orjson

from distillery.core.errors import DistilleryError
from distillery.core.shadow import EVAL_TAG
from distillery.curation.endpoints import Endpoint
from distillery.store import Store, cache
from distillery.store.records import Role

EVAL_HEADER = {f"X-Distillery-Tag-{EVAL_TAG[0]}": EVAL_TAG[1]}  # stored as the tag EVAL_TAG


@dataclass(frozen=True)
class Candidate:
    label: str
    model: str
    endpoint: Endpoint
    # What the model *is*, when the caller knows (distill: the served directory's content
    # hash); otherwise the endpoint's /v1/models is asked.  The cache keys on this.
    identity: str | None = None
    # Who it is in the comparison: distill's teacher, base student and fine-tuned student.
    role: Role = "candidate"


@dataclass
class Generation:
    message: dict[str, Any] | None
    usage: dict[str, Any]
    latency_ms: float | None
    cached: bool
    error: str | None = None

    @property
    def text(self) -> str:
        content = (self.message or {}).get("content")
        return content if isinstance(content, str) else ""


def parse_candidates(
    specs: list[str] | tuple[str, ...], endpoints: dict[str, Endpoint], default: Endpoint
) -> list[Candidate]:
    """``MODEL[@ENDPOINT]`` specs as candidates, each endpoint's key checked before any work."""
    candidates = []
    for spec in specs:
        model, _, name = spec.partition("@")
        if name and name not in endpoints:
            raise DistilleryError(
                f'No endpoint {name!r} in the config: add [endpoints.{name}] base_url = "...".'
            )
        candidates.append(Candidate(spec, model, endpoints[name] if name else default))
    for candidate in candidates:
        candidate.endpoint.check()  # name the unset variable, never fall back to another key
    return candidates


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()


class Generator:
    def __init__(
        self,
        store: Store,
        *,
        concurrency: int = 8,
        timeout: float = 120.0,
        retries: int = 4,
        use_cache: bool = True,
    ) -> None:
        self.store = store
        self.use_cache = use_cache
        self._identities: dict[tuple[str, Endpoint], str | None] = {}
        self.uncached: set[str] = set()  # models whose identity could not be established
        self.semaphore = asyncio.Semaphore(concurrency)
        self.timeout = timeout
        self.retries = retries
        self.calls = 0
        self.cache_hits = 0
        self._clients: dict[Endpoint, openai.AsyncOpenAI] = {}

    def client(self, endpoint: Endpoint) -> openai.AsyncOpenAI:
        endpoint.check()
        if endpoint not in self._clients:
            self._clients[endpoint] = openai.AsyncOpenAI(
                base_url=endpoint.base_url,
                api_key=endpoint.api_key,
                max_retries=self.retries,
                timeout=self.timeout,
                default_headers=EVAL_HEADER,
            )
        return self._clients[endpoint]

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    async def identity(self, candidate: Candidate) -> str | None:
        """What the cache knows the model as, or ``None`` (then nothing is cached for it).

        Never its address: a new model served under the same name and port must
        miss, and the same files served anywhere must hit.  A model Distillery
        serves reports its directory's content hash in ``/v1/models``; any other
        is known by its ``/v1/models`` entry (id, owner, root) and base URL.
        """
        if candidate.identity is not None:
            return candidate.identity
        slot = (candidate.model, candidate.endpoint)
        if slot not in self._identities:
            self._identities[slot] = await self._ask_identity(candidate)
            if self._identities[slot] is None:
                self.uncached.add(candidate.model)
        return self._identities[slot]

    async def _ask_identity(self, candidate: Candidate) -> str | None:
        try:
            listing = await self.client(candidate.endpoint).models.list()
        except openai.OpenAIError:
            return None
        for model in listing.data:
            if model.id != candidate.model:
                continue
            entry = model.model_dump()
            if entry.get("distillery_model_hash"):
                return f"files:{entry['distillery_model_hash']}"
            fields = {k: entry.get(k) for k in ("id", "owned_by", "root")}
            return cache_key("model", fields, candidate.endpoint.base_url)
        return None

    async def complete(
        self, candidate: Candidate, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> Generation:
        identity = await self.identity(candidate) if self.use_cache else None
        key = cache_key("chat", identity, messages, params) if identity else None
        hit = await asyncio.to_thread(cache.get, self.store, key) if key else None
        if hit is not None:
            self.cache_hits += 1
            return Generation(hit["message"], hit["usage"], hit["latency_ms"], cached=True)
        async with self.semaphore:
            started = time.perf_counter()
            try:
                self.calls += 1
                response = await self.client(candidate.endpoint).chat.completions.create(
                    model=candidate.model,
                    messages=cast(Any, messages),
                    **params,
                )
            except openai.OpenAIError as exc:
                return Generation(None, {}, None, cached=False, error=_describe(exc))
            latency = round((time.perf_counter() - started) * 1000, 3)
        if not response.choices:
            return Generation(None, {}, latency, cached=False, error="no choices in the answer")
        message = response.choices[0].message.model_dump(exclude_none=True)
        usage = response.usage.model_dump(exclude_none=True) if response.usage else {}
        stored = {"message": message, "usage": usage, "latency_ms": latency}
        if key:
            await asyncio.to_thread(cache.put, self.store, key, candidate.model, stored, latency)
        return Generation(message, usage, latency, cached=False)

    async def embed(self, endpoint: Endpoint, model: str, texts: list[str]) -> list[list[float]]:
        key = cache_key("embed", model, endpoint.base_url, texts)
        hit = await asyncio.to_thread(cache.get, self.store, key) if self.use_cache else None
        if hit is not None:
            self.cache_hits += 1
            return list(hit["vectors"])
        async with self.semaphore:
            self.calls += 1
            response = await self.client(endpoint).embeddings.create(model=model, input=texts)
        vectors = [item.embedding for item in sorted(response.data, key=lambda d: d.index)]
        await asyncio.to_thread(cache.put, self.store, key, model, {"vectors": vectors}, 0.0)
        return vectors


def _describe(exc: openai.OpenAIError) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"
