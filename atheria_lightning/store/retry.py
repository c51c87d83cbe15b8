"""The mirror's one retry policy: an attempt retried with a jittered backoff, or given up at once when no retry
can change its error."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: Errors of a mirror's layout, not of its connection: a file where a folder should be (the lease's, a
#: checkpoint's), or the other way round. They stay until a person moves what is in the way.
IN_THE_WAY: tuple[type[OSError], ...] = (FileExistsError, NotADirectoryError, IsADirectoryError)


@dataclass(frozen=True)
class Retry:
    """Up to ``max_retries`` more attempts after the first, ``backoff_s`` doubling between them; ``sleep`` waits."""

    max_retries: int
    backoff_s: float
    sleep: Callable[[float], Any]

    def __call__(self, attempt: Callable[[], Any], give_up: tuple[type[BaseException], ...] = ()) -> Any:
        """``attempt()``, retried with backoff; the ``give_up`` errors, and a file or folder where the other should
        be (:data:`IN_THE_WAY`), are raised at once: no retry changes them."""
        for retry in range(self.max_retries + 1):
            try:
                return attempt()
            except (*give_up, *IN_THE_WAY):
                raise
            except Exception as err:
                if retry == self.max_retries:
                    raise
                # Jitter, so that runs sharing a bucket or a Drive account do not retry in step.
                delay = self.backoff_s * 2**retry * random.uniform(0.5, 1.5)
                log.debug("mirror attempt %d failed (%s), retrying in %.1f s", retry + 1, err, delay)
                self.sleep(delay)
        return None
