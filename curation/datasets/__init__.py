"""Datasets: captured calls scanned, redacted, validated, deduplicated and split into versions."""
