"""The dashboard tests' fixtures: a proxy with the dashboard and alice's and bob's calls,
a fake fine-tuning API, and every client a test opened closed after it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from distillery.core.config import key_fingerprint
from distillery.store import open_store

from fake_finetuning import FakeFineTuning
from helpers import RunningProxy, ServerThread
from ui_data import ADMIN, ALICE, BOB, OPEN, XSS, call


@pytest.fixture
def dashboard(start_proxy: Callable[..., RunningProxy]) -> Iterator[RunningProxy]:
    """A proxy with the dashboard, and a store holding alice's and bob's calls."""
    proxy = start_proxy({"auth": {"admin_keys": [key_fingerprint(ADMIN)]}}, dashboard=True)
    store = open_store(proxy.settings.storage.resolved_database_url())
    store.insert(
        [call(n, ALICE, f"support question {n}", {"app": "support"}) for n in range(1, 56)]
        + [call(n, ALICE, f"sales question {n}", {"app": "sales"}) for n in range(56, 61)]
        + [call(61, BOB, "bob's own question", {"app": "support"})]
        + [call(62, ALICE, XSS, {"app": "support", "note": XSS}, model=XSS)]
    )
    store.close()
    yield proxy


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


# -- Distill --------------------------------------------------------------------------


@pytest.fixture
def fine_tuning_api(servers: ServerThread, monkeypatch: pytest.MonkeyPatch) -> FakeFineTuning:
    """The fake fine-tuning API, where the openai backend finds it (OPENAI_BASE_URL)."""
    fake = FakeFineTuning()
    fake.url, _ = servers.serve(fake.app)
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url + "/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fine-tuning")
    return fake
