"""Evals: candidates answer items (a dataset or a file), graders score them, runs compare.

The built-in grader types register themselves here, when anything of the package is first
imported: ``graders.py`` (the interface a user's grader imports) never imports them, so
neither imports the other from inside a function.
"""

from distillery.curation.evals import builtin_graders  # noqa: F401  (registers the built-ins)
