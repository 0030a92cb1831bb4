"""What tokens cost: a dated default table for OpenAI's common models, and the config's.

The defaults are OpenAI's published standard prices (USD per million tokens: input,
output, and training for the models its API fine-tunes) as of ``AS_OF``;
``[prices."model"]`` in the config overrides or adds any.  A dated snapshot
(``gpt-4o-2024-08-06``) costs what its model does.  A model in neither table -- a
fine-tuned ``ft:`` model, another provider's -- has no price, and its cost is shown as
unknown, never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from distillery.core.config import Price

AS_OF = "2025-08"
DEFAULTS: dict[str, Price] = {
    name: Price(input=i, output=o, training=t)
    for name, (i, o, t) in {
        "gpt-5": (1.25, 10.0, None),
        "gpt-5-mini": (0.25, 2.0, None),
        "gpt-5-nano": (0.05, 0.40, None),
        "gpt-4.1": (2.0, 8.0, 25.0),
        "gpt-4.1-mini": (0.40, 1.60, 5.0),
        "gpt-4.1-nano": (0.10, 0.40, 1.50),
        "gpt-4o": (2.50, 10.0, 25.0),
        "gpt-4o-mini": (0.15, 0.60, 3.0),
        "o3": (2.0, 8.0, None),
        "o4-mini": (1.10, 4.40, None),
        "o3-mini": (1.10, 4.40, None),
    }.items()
}
_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$")


def price_for(model: str, configured: Mapping[str, Price]) -> Price | None:
    """The price of ``model``: the config's, else the default table's, else ``None``."""
    for name in (model, _SNAPSHOT.sub("", model)):
        if name in configured:
            return configured[name]
        if name in DEFAULTS:
            return DEFAULTS[name]
    return None


def cost(
    model: str, prompt_tokens: int, completion_tokens: int, configured: Mapping[str, Price]
) -> float | None:
    """USD for these tokens, or ``None`` when the model has no price (and used tokens)."""
    if not prompt_tokens and not completion_tokens:
        return 0.0
    price = price_for(model, configured)
    if price is None:
        return None
    return (prompt_tokens * price.input + completion_tokens * price.output) / 1_000_000


def training_cost(model: str, trained_tokens: int, configured: Mapping[str, Price]) -> float | None:
    """USD to fine-tune ``model`` on this many tokens (epochs included), if it has a price."""
    price = price_for(model, configured)
    if price is None or price.training is None:
        return None
    return trained_tokens * price.training / 1_000_000
