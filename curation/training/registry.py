"""The fine-tuning backends by name: the built-ins, a plugin's, or one code registers.

``--backend NAME``, the dashboard and ``distill`` open backends through :func:`open_backend`.
The interface (:mod:`.backends`) never imports an implementation; this module imports them all.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

from distillery.curation.training import local, memory, openai_api
from distillery.curation.training.backends import BackendContext, FineTuneBackend, FineTuneError

Factory = Callable[[BackendContext], FineTuneBackend]
_REGISTRY: dict[str, Factory] = {}


def register(name: str, factory: Factory) -> None:
    """Make ``--backend NAME`` open a backend with ``factory(context)``."""
    _REGISTRY[name] = factory


def names() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


def open_backend(name: str, context: BackendContext) -> FineTuneBackend:
    """The backend called ``name``, opened for ``context``."""
    _load_plugins()
    if name in _BROKEN:
        raise FineTuneError(_BROKEN[name])
    if name not in _REGISTRY:
        raise FineTuneError(
            f"No fine-tuning backend {name!r}: use one of {', '.join(sorted(_REGISTRY))}, "
            "or install a package that adds one (entry point group 'distillery.backends')."
        )
    return _REGISTRY[name](context)


_plugins_loaded = False
_BROKEN: dict[str, str] = {}  # plugins that failed to load: said when asked for, not before


def _load_plugins() -> None:
    """Every ``distillery.backends`` entry point, once per process."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in entry_points(group="distillery.backends"):
        try:
            register(entry.name, entry.load())
        except Exception as exc:  # a broken plugin must not break the built-ins
            _BROKEN[entry.name] = f"The backend plugin {entry.value!r} failed to load: {exc}"


register("openai", openai_api.OpenAIBackend.open)
register("local", local.LocalBackend.open)
register("memory", memory.InMemoryBackend.open)
