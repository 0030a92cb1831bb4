"""Where a model runs and the one key that may be sent there: evals, judges, fine-tuning."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from distillery.core.errors import DistilleryError

# What a keyless endpoint (a local vLLM, `distillery serve`) is sent: the SDK insists on a
# key, and sending none of the user's keys is the point.
KEYLESS = "distillery-no-key"


@dataclass(frozen=True)
class Endpoint:
    """Where a model runs, and the one key that may be sent there.

    A key is only ever the one configured for this endpoint: never the SDK's
    fallback to ``OPENAI_API_KEY`` when the configured variable is unset.
    Build endpoints with :meth:`from_env`; ``api_key`` is ``None`` only when
    the configured variable is missing, and ``missing`` says which.
    """

    name: str
    base_url: str | None = None  # None: the SDK's default (OPENAI_BASE_URL or OpenAI)
    api_key: str | None = None
    missing: str | None = None  # the unset variable the key should come from

    @classmethod
    def from_env(
        cls,
        name: str,
        base_url: str | None = None,
        api_key_env: str | None = None,
        *,
        default_env: str | None = "OPENAI_API_KEY",
    ) -> Endpoint:
        """The key from ``api_key_env``, else from ``default_env``; ``None`` for both: keyless."""
        variable = api_key_env or default_env
        if variable is None:
            return cls(name, base_url, KEYLESS)
        key = os.environ.get(variable)
        return cls(name, base_url, key) if key else cls(name, base_url, None, missing=variable)

    def check(self) -> None:
        """Raise, naming the variable, when this endpoint has no key to send."""
        if self.api_key is None:
            where = f" for endpoint {self.name!r}" if self.name != "default" else ""
            raise DistilleryError(
                f"${self.missing or 'OPENAI_API_KEY'} is not set: it holds the API key{where}. "
                "Export it (no other key is sent in its place)."
            )


def configured(settings: Any) -> dict[str, Endpoint]:
    """The config's ``[endpoints.NAME]``; one without ``api_key_env`` is keyless: it never
    gets ``OPENAI_API_KEY``."""
    return {
        name: Endpoint.from_env(name, e.base_url, e.api_key_env, default_env=None)
        for name, e in settings.endpoints.items()
    }
