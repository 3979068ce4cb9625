"""Reading JSON that anybody may have written (configs, safetensors headers, manifests, JSONL data):
every way such a text can fail comes back as one ``JsonTextError`` whose message is one line.

``json.loads`` alone raises a ``JSONDecodeError`` for a syntax error, but a plain ``ValueError`` for
an integer of more than 4,300 digits, a ``RecursionError`` for 100,000 nested brackets, a
``UnicodeDecodeError`` for bytes that are not UTF-8, and accepts ``NaN`` and ``Infinity``, which are
not JSON. Torch-free.
"""

from __future__ import annotations

import json
from typing import Any


class JsonTextError(ValueError):
    """A text that is not valid JSON, said in one line (with the line and column where known)."""


def _no_constants(name: str) -> Any:
    raise JsonTextError(f"{name} is not a JSON number")


def parse_json(text: str | bytes) -> Any:
    """``json.loads(text)``, failing only with ``JsonTextError``."""
    try:
        return json.loads(text, parse_constant=_no_constants)
    except JsonTextError:
        raise
    except json.JSONDecodeError as error:
        raise JsonTextError(f"line {error.lineno} column {error.colno}: {error.msg}") from None
    except RecursionError:
        raise JsonTextError("nested too deeply") from None
    except UnicodeDecodeError as error:
        raise JsonTextError(f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    except ValueError as error:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise JsonTextError(first) from None
