"""The errors a user's config or input can cause. The CLI prints their message alone and exits 2;
anything else is a bug, and keeps its traceback."""

import re

# What Ray Data appends to the message of an error raised in a read or map task.
_RAY_RETRY_NOTE = re.compile(r"\nFailed to .+ after \d+/\d+ attempts \(total backoff [\d.]+s\)\.[\s\S]*\Z")


class UserError(ValueError):
    """Something the user can fix; the message says what, where and how."""


class ConfigError(UserError):
    """A config file or override that cannot be used; the message names the file and the key."""


class InputError(UserError):
    """An input that cannot be read at all. The message names the file (and line) and what to do."""


def user_error(error: BaseException | None) -> UserError | None:
    """The user's error behind `error`, or None when there is none.

    An error raised in a Ray task or actor reaches the driver wrapped (a `RayTaskError` that is
    also an instance of the original class, whose text is the worker's whole traceback): the
    original is its `cause`, which is what the user should read, less the note on retries that
    Ray Data adds to the message of an error in a read or map task.

    >>> user_error(RuntimeError("x")) is None, str(user_error(InputError("a.jsonl: the file is empty")))
    (True, 'a.jsonl: the file is empty')
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None)  # a RayTaskError's original exception
        if isinstance(error, UserError) and not isinstance(inner, BaseException):
            if error.args and isinstance(error.args[0], str) and _RAY_RETRY_NOTE.search(error.args[0]):
                error = type(error)(_RAY_RETRY_NOTE.sub("", error.args[0]))
            return error
        error = inner if isinstance(inner, BaseException) else error.__cause__ or error.__context__
    return None


class CapReached(Exception):
    """A stage stopped sending at its spending cap (`max_cost_usd`): what came back is saved, and
    the same command with a higher cap goes on from there. The message says what was spent, what
    is left and how to go on. The CLI exits with `EXIT_CAP_REACHED`."""


# The exit code of a stage stopped at its spending cap.
EXIT_CAP_REACHED = 4
