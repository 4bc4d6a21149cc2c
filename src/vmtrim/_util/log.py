"""The ``vmtrim`` logger tree.

Library users see nothing unless they configure logging (a NullHandler on the
``vmtrim`` logger keeps Python's last-resort handler quiet); ``vmtrim --debug`` adds a
stderr handler at DEBUG. Modules call :func:`get_logger` instead of importing logging
in ``vmtrim/__init__``, which would cost every command, ``--version`` included, ~10 ms.
"""

from __future__ import annotations

import logging

logging.getLogger("vmtrim").addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """The logger for module ``name`` (``__name__``), under ``vmtrim``."""
    return logging.getLogger(name)
