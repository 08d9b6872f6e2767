"""One exception tree for qops. Every error knows the exit code the CLI turns it into.

Exit codes (docs/commands.md): 0 ok, 1 failed, 2 usage, 69 no node replied, 73 cannot create
(pidfile held), 74 broker/backend unreachable, 75 partial, 77 privileges.
"""

from __future__ import annotations

EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 2
EX_UNAVAILABLE = 69
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77


class QopsError(Exception):
    """Base of every error qops raises on purpose."""

    exit_code = EX_FAILURE


class UsageError(QopsError):
    """Bad input from the user: an option, an argument, a URL, a template."""

    exit_code = EX_USAGE


class ConfigError(UsageError):
    """A setting is unknown or has a value of the wrong type."""


class AppNotFound(UsageError):
    """`-A` did not lead to an App."""


class BrokerUnreachable(QopsError):
    """The broker or result backend cannot be reached, or refused the credentials."""

    exit_code = EX_IOERR


class PublishError(QopsError):
    """A message could not be published (unroutable, not confirmed, connection lost)."""

    exit_code = EX_IOERR


class PublishManyError(PublishError):
    """Part of a bulk send was not confirmed by the broker (docs/guarantees.md).

    ``unconfirmed``: the indexes, in the batch, of the messages the broker did not
    confirm (nacked, unroutable, or in flight when the connection or channel went
    away), in order; ``task_ids``: their task ids, for a bulk send of tasks. Every
    other message of the batch was confirmed."""

    def __init__(self, message: str, unconfirmed: list[int],
                 task_ids: list[str] | None = None) -> None:
        super().__init__(message)
        self.unconfirmed = list(unconfirmed)
        self.task_ids = list(task_ids or [])


class NoReply(QopsError):
    exit_code = EX_UNAVAILABLE


class PartialReply(QopsError):
    exit_code = EX_TEMPFAIL


class QueueNotFound(QopsError):
    """A queue named with -Q does not exist on the broker."""


class PidfileLocked(QopsError):
    exit_code = EX_CANTCREAT


class DuplicateNode(QopsError):
    """A live node already answers to this name (Celery only warns:
    DuplicateNodenameWarning; its replies would be merged with the new one's)."""

    exit_code = EX_CANTCREAT


class PrivilegeError(QopsError):
    exit_code = EX_NOPERM


# -- task-level errors (raised in workers or by AsyncResult.get) -----------------


class TaskError(QopsError):
    """Base of errors about running a task."""


class NotRegistered(TaskError, KeyError):
    """The worker has no task by that name."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want plain text
        return Exception.__str__(self)


class ProtocolError(TaskError):
    """A message that is not a valid task message (bad JSON, v1 protocol, ...)."""


class TimeLimitExceeded(TaskError):
    """The task ran past its hard time limit and its pool process was replaced."""


class SoftTimeLimitExceeded(TaskError):
    """Raised inside a task when its soft time limit passes."""


class WorkerLostError(TaskError):
    """The pool process running the task died."""


class TaskRevokedError(TaskError):
    """The task was revoked (or had expired) before it ran."""


class ChordError(TaskError):
    """A task of a chord's header failed (or the body could not be sent): the chord's
    result (its body's) holds this, as Celery's ``celery.exceptions.ChordError``."""


class ResultTimeout(TaskError, TimeoutError):
    """AsyncResult.get() did not see a final state in time."""


class NoResultBackend(ConfigError):
    """A result was asked for but the app has no result backend."""


class Retry(TaskError):  # noqa: N818 - Celery's name, kept for familiarity
    """Raised by Task.retry(); tells the worker to send the task again."""

    def __init__(self, message: str = "", exc: BaseException | None = None,
                 when: float | None = None) -> None:
        super().__init__(message or (f"Retry in {when}s" if when is not None else "Retry"))
        self.exc = exc
        self.when = when


class MaxRetriesExceeded(TaskError):
    """A task asked to be retried more times than max_retries allows."""


class Reject(TaskError):  # noqa: N818 - Celery's name
    """Raised by a task to reject its message (dead-letter it, or requeue)."""

    def __init__(self, reason: str = "", requeue: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.requeue = requeue
