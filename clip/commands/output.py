"""Printing file names that are not valid UTF-8 (Python holds them with surrogate escapes).

`print` of such a name under a UTF-8 locale raises UnicodeEncodeError, which would abort a command after
its work is done and lose its results.  Text lines are written with the name's own bytes instead (so the
output can be fed back to other tools, like `ls` output); JSON lines escape them (`"\\udcff"`), which keeps
the JSON valid and gives Python's `json.loads` the exact name back.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any


def print_line(text: str, file: IO[str] | None = None) -> None:
    """`print(text)`, writing the original bytes of any non-UTF-8 file name `text` holds."""
    stream = sys.stdout if file is None else file
    try:
        stream.write(text + "\n")
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "utf-8"
        try:
            data = text.encode(encoding, "surrogateescape")
        except UnicodeEncodeError:  # characters the stream's encoding lacks, besides the escaped bytes
            data = text.encode(encoding, "backslashreplace")
        buffer = getattr(stream, "buffer", None)
        if buffer is None:  # a text-only stream: show the bytes as escapes rather than fail
            stream.write(data.decode(encoding, "backslashreplace") + "\n")
        else:
            stream.flush()
            buffer.write(data + b"\n")
            buffer.flush()
    stream.flush()


def json_line(obj: Any, **kwargs: Any) -> str:
    """`json.dumps(obj, ensure_ascii=False, **kwargs)`, escaping only when a string cannot be encoded."""
    text = json.dumps(obj, ensure_ascii=False, **kwargs)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, **kwargs)
    return text
