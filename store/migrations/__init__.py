"""Schema migrations (alembic), applied by ``store.db.migrate`` under a lock.

``HEAD`` names the newest revision so that the common case, a database that
is already current, is one SELECT instead of loading alembic.  A test checks
it against the revision files.
"""

from pathlib import Path

HEAD = "0009"
LOCATION = Path(__file__).parent
