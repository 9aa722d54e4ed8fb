"""One module per ``python -m shard_tools`` command (thin: parse args, call the library)."""


def error_line(exc: BaseException) -> str:
    """The one line a command prints for bad input: ``<path>: <reason>`` for OS errors
    that name a file, else the message's first line (also used by ``retrieval``)."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        return f"{where}: {exc.strerror}"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
