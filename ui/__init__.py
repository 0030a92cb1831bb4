"""The dashboard: captured traffic, datasets, fine-tunes and evals in a browser.

Server-rendered HTML (jinja2) with htmx for partial updates; every asset ships in
``ui/static``, so it works offline with no build step.  The proxy mounts it at
``/ui/``; ``distillery ui`` serves it alone against the same store.  It reads and
writes through ``store/`` and ``curation/`` like the CLI: no second implementation.
"""
