"""The one exception type users should ever see from d2v for bad input."""


class SpecError(ValueError):
    """Bad input (spec, data, checkpoint, plugin): the message says what, where and what to do.

    The CLI prints it as one line and exits with code 2 instead of a traceback.
    """


class TrainingCollapse(RuntimeError):
    """Self-supervised training collapsed (targets or predictions lost their variance).

    Raised by objectives; the runner stops with the message, keeping the last good
    checkpoint untouched.
    """


class BadFile(SpecError):
    """An example's file cannot be used: missing, unreadable, undecodable, truncated, empty, in
    the wrong encoding. A property of the file, not of the code: ``data.on_bad_example: skip``
    leaves such an example out (listed, and counted against ``data.max_skipped_fraction``);
    anything else an example raises stops the run. Processors and datasets raise it for exactly
    these problems."""


def positive_int(value: object, name: str, where: str, *, allow_zero: bool = False) -> int:
    """``value`` if it is a positive (or, with ``allow_zero``, non-negative) integer, else a
    :class:`SpecError` naming the component and the parameter (``True`` is not an integer here)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "a non-negative" if allow_zero else "a positive"
        raise SpecError(f"{where}: {name} must be {kind} integer, got {value!r}.")
    return value
