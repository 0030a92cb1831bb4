"""What a route's judge host (``judge.py``, in the proxy's process) and its runtime
(``judging.py``, in a process of its own) agree on: how pairs are framed in the pipe
between them, and how long a stop waits.  Both import this; neither imports the other's
module for it."""

from __future__ import annotations

import struct

CLOSE_S = 30.0  # how long a stop waits for the pairs being graded
FRAME = struct.Struct("!I")  # a pair's length before it, in the pipe
