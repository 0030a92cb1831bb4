"""What every part shares: settings, errors, logging, redaction, OpenAI's shapes and
error JSON, prices, the shadow marker.  Imports no other part of the package."""
