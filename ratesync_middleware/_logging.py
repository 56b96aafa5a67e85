"""Log lines that say who speaks and how loud, even where nobody configured logging.

Under a bare `uvicorn app:app`, `flask run`, `manage.py runserver` or `gunicorn`, the servers
configure their own loggers only (`uvicorn.error`, `django`, `gunicorn.error`), not the root
logger. A record of ours then reaches no handler and Python's `logging.lastResort` prints its
message alone: "store 'prod' failed: ..." with no level and no name. So the package logger has
a handler that prints `WARNING ratesync_middleware: ...` to stderr, and only when no other
handler would see the record: once the application configures logging (`basicConfig`, Django's
`LOGGING` with a root or `ratesync_middleware` handler, `dictConfig`), its handlers alone apply.
"""

from __future__ import annotations

import logging
import sys

PACKAGE_LOGGER = "ratesync_middleware"
FORMAT = "%(levelname)s %(name)s: %(message)s"


class FallbackHandler(logging.Handler):
    """Prints a record to stderr (as lastResort would, with level and name) when it is the only
    handler on the record's way up the logger hierarchy."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if self._others_handle(record):
            return
        try:
            sys.stderr.write(self.format(record) + "\n")  # the stderr of now (tests swap it)
            sys.stderr.flush()
        except Exception:
            self.handleError(record)

    def _others_handle(self, record: logging.LogRecord) -> bool:
        """Whether another handler on the record's way (the path `Logger.callHandlers`
        walks) takes it."""
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            for handler in logger.handlers:
                if handler is not self and record.levelno >= handler.level:
                    return True
            if not logger.propagate:
                return False
            logger = logger.parent
        return False


def install() -> None:
    """Add the fallback handler to the package logger, once."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    if not any(isinstance(handler, FallbackHandler) for handler in logger.handlers):
        logger.addHandler(FallbackHandler())
