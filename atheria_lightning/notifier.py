"""Notifier: a run's notifications (ntfy, Telegram, Discord, e-mail, ~100 more through apprise), sent by one
background thread so that a slow or dead service never delays or fails training."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from atheria_lightning.errors import ConfigError

__all__ = ["DRAIN_SECONDS", "NOTIFY_EXTRA_HINT", "Notifier", "progress_text"]

log = logging.getLogger(__name__)

NOTIFY_EXTRA_HINT = 'pip install "atheria_lightning[notify]" (or pip install apprise)'
#: What ``--notify`` takes, as a user writes it (the apprise wiki lists every service and its URL).
URL_EXAMPLES = (
    "ntfy://TOPIC, tgram://BOT_TOKEN/CHAT_ID, discord://WEBHOOK_ID/WEBHOOK_TOKEN, "
    "mailto://USER:APP_PASSWORD@gmail.com or json://HOST:PORT/ (https://github.com/caronc/apprise/wiki lists them)"
)
#: Messages waiting for a slow service; past this, a new one is dropped (with a warning) rather than waited for.
QUEUE_SIZE = 16
#: At the end of the command, the longest wait for the messages still queued.
DRAIN_SECONDS = 5.0


@dataclass(frozen=True)
class _Message:
    kind: str  # apprise's notify type: info, success, warning, failure
    title: str
    body: str


class Notifier:
    """Sends the run's notifications to every service of ``urls``, in the background, each message titled
    ``atheria <experiment>: …``. What the messages say is here; when they are sent is the caller's
    (:class:`~atheria_lightning.callbacks.Notify` during training, ``AtheriaCLI`` at the end of the command).

    One daemon thread sends the queued messages in order, one service after another; each send is bounded by the
    service's own socket timeouts (apprise: 4 s to connect, 4 s per read, ``?cto=`` and ``?rto=`` in the URL change
    them). Nothing here raises into training: a message that a service refuses or cannot take is one warning line
    naming the service; a full queue drops the new message with one warning line.

    Args:
        urls: apprise URLs (``ntfy://TOPIC``, ``tgram://BOT_TOKEN/CHAT_ID``, …); duplicates count once.
        experiment: The run's ``experiment_name``, named in every message.

    Raises:
        ConfigError: A URL apprise does not accept, or apprise not installed.

    Example::

        notifier = Notifier(["ntfy://my-atheria-runs"], "demo")
        notifier.finished("episode 600 of 600 (100%)", best="val/loss 0.0123 (episode 580)")
        notifier.close()
    """

    def __init__(self, urls: Sequence[str], experiment: str) -> None:
        self.experiment = experiment
        self._services = _services(list(dict.fromkeys(urls)))
        self._queue: queue.Queue[_Message | None] = queue.Queue(maxsize=QUEUE_SIZE + 1)  # + close()'s None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._unsent = 0  # queued and not yet through every service
        self._sending: str | None = None  # the service being sent to now
        self._closed = False  # no new message is taken
        self._abandoned = False  # close() stopped waiting: the thread drops what is left

    @property
    def services(self) -> list[str]:
        """The services, as the warnings name them: ``Telegram (tgram://1...p/12345/)``, secrets elided."""
        return [_service_name(service) for service in self._services]

    # ----- the messages -----
    def finished(self, where: str, best: str | None = None) -> None:
        body = f"Training finished: {where}." + (f" Best {best}." if best else "")
        self.send("success", "finished", body)

    def stopped(self, where: str, reason: str | None) -> None:
        because = f"; {reason}" if reason else ""
        body = f"Stopped at {where}{because}. Its checkpoint is saved: run the same command again to continue."
        self.send("warning", f"stopped at {where}", body)

    def failed(self, exit_code: int, where: str, line: str) -> None:
        self.send("failure", f"failed (exit {exit_code})", f"Failed at {where} with exit code {exit_code}: {line}")

    def ended(self, line: str) -> None:
        """The command stopped outside training (a signal during start-up or the final flush), exit code 0."""
        self.send("warning", "stopped", line)

    def mirror_behind(self, exit_code: int, line: str) -> None:
        self.send("warning", f"mirror behind (exit {exit_code})", f"{line[:1].upper()}{line[1:]}.")

    def memory_high(self, where: str, percent: dict[str, float], threshold: float) -> None:
        full = ", ".join(f"{name} {value:.0f}%" for name, value in percent.items())
        names = " and ".join(name for name, value in percent.items() if value >= threshold)
        body = (f"{full} at {where} (alert at {threshold:.0f}%, sent once per session): the session may be killed or "
                "the next episode fail when memory runs out; the run resumes from its last checkpoint.")  # fmt: skip
        self.send("warning", f"{names} at {max(percent.values()):.0f}%", body)

    # ----- sending -----
    def send(self, kind: str, title: str, body: str) -> None:
        """Queue one message (title ``atheria <experiment>: <title>``) and return at once."""
        message = _Message(kind, f"atheria {self.experiment}: {title}", body)
        with self._lock:
            if self._closed:
                return
            if self._unsent >= QUEUE_SIZE:
                log.warning("notification %r dropped: %d earlier ones still wait for %s", message.title, QUEUE_SIZE,
                            ", ".join(self.services))  # fmt: skip
                return
            if self._thread is None:  # started by the first message: a run that sends nothing has no thread
                self._thread = threading.Thread(target=self._work, name="atheria-notify", daemon=True)
                self._thread.start()
            self._unsent += 1
            self._queue.put_nowait(message)

    def close(self, timeout_s: float | None = None) -> None:
        """Wait at most ``timeout_s`` (``DRAIN_SECONDS``) for the queued messages; those still unsent then are dropped
        with one warning. Later messages are ignored."""
        timeout_s = DRAIN_SECONDS if timeout_s is None else timeout_s
        with self._lock:
            thread = None if self._closed else self._thread
            self._closed = True
            if thread is None:
                return
            self._queue.put_nowait(None)  # the thread ends after the queued messages; the queue keeps room for it
        thread.join(timeout_s)
        with self._lock:
            unsent, sending = self._unsent, self._sending
            self._abandoned = True
        if unsent:
            log.warning("%d notification(s) not sent: %s did not answer within %.0f s of the end of the command",
                        unsent, sending or ", ".join(self.services), timeout_s)  # fmt: skip

    def _work(self) -> None:
        while (message := self._queue.get()) is not None:
            for service in self._services:
                with self._lock:
                    if self._abandoned:  # close() gave up waiting and said so: the rest is dropped
                        return
                    self._sending = _service_name(service)
                problem = _send(service, message)
                with self._lock:
                    self._sending = None
                    if problem is not None and not self._abandoned:
                        log.warning("notification %r to %s not sent: %s", message.title, _service_name(service),
                                    problem)  # fmt: skip
            with self._lock:
                self._unsent -= 1


def progress_text(done: int, total: int | None) -> str:
    """``episode 3 of 6 (50%)``; ``step 3`` when the run does not count episodes."""
    if total is None:
        return f"step {done}"
    return f"episode {done} of {total} ({100.0 * done / max(total, 1):.0f}%)"


def _services(urls: list[str]) -> list[Any]:
    """One apprise service per URL, parsed by apprise itself; a URL it refuses is a :class:`ConfigError`."""
    try:
        import apprise
    except ImportError:
        raise ConfigError(f"notify needs apprise, which is not installed: {NOTIFY_EXTRA_HINT}") from None
    services = []
    for url in urls:
        with _apprise_log() as said:
            service = apprise.Apprise.instantiate(url) if isinstance(url, str) and url.strip() else None
        if service is None:
            why = f" ({said[-1]})" if said else ""
            raise ConfigError(f"notify={url!r} is not a notification URL apprise accepts{why}: give one such as "
                              f"{URL_EXAMPLES}")  # fmt: skip
        services.append(service)
    return services


def _send(service: Any, message: _Message) -> str | None:
    """Send ``message`` through one service; None when it took it, else why not (apprise's own last words)."""
    started = time.monotonic()
    with _apprise_log() as said:
        try:
            sent = service.notify(body=message.body, title=message.title, notify_type=message.kind)
        except Exception as err:  # a service's bug must not end the thread that sends the others
            return f"{type(err).__name__}: {err}"
    if sent:
        return None
    return (said[-1] if said else "the service refused it") + f" (after {time.monotonic() - started:.1f} s)"


def _service_name(service: Any) -> str:
    # apprise's privacy form elides tokens and passwords; its query string is only settings.
    return f"{service.service_name} ({service.url(privacy=True).split('?')[0]})"


@contextmanager
def _apprise_log() -> Iterator[list[str]]:
    """apprise's warnings and errors, collected instead of printed: the caller turns them into its one line."""
    import apprise

    said: list[str] = []
    handler = _ListHandler(said)
    logger = logging.getLogger(apprise.LOGGER_NAME)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield said
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


class _ListHandler(logging.Handler):
    def __init__(self, said: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.said = said

    def emit(self, record: logging.LogRecord) -> None:
        self.said.append(" ".join(record.getMessage().split()))
