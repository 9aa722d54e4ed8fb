"""One module per ``python -m shard_tools`` command (thin: parse args, call the library)."""
import re

# FAISS's C++ errors: "Error in <signature> at <file>:<line>: Error: '<check>' failed: <why>"
_CPP_WHERE = re.compile(r"^Error in .*? at \S+:\d+: ")
_CPP_CHECK = re.compile(r"^Error: '.*?' failed(?:: |$)")


def error_line(exc: BaseException) -> str:
    """The one line a command prints for bad input: ``<path>: <reason>`` for OS errors
    that name a file, else the message's first line (also used by ``retrieval``), without
    the C++ signature and source location FAISS puts before its reason."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        return f"{where}: {exc.strerror}"
    text = str(exc).strip().splitlines()
    return strip_cpp_location(text[0]) if text else type(exc).__name__


def strip_cpp_location(line: str) -> str:
    """``Error in void f(int) at x.cpp:9: Error: 'n > 0' failed: too few`` -> ``too few``
    (the check itself when no reason follows); other lines are returned as they are."""
    short = _CPP_WHERE.sub("", line, count=1)
    if short == line:
        return line
    reason = _CPP_CHECK.sub("", short, count=1).strip()
    return reason or short.strip()
