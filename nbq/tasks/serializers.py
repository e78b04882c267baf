"""Task argument and result serializers: pickle (default), json, msgpack, as Celery names them.

The engine always pickles what it sends (and signs it); a json or msgpack task
additionally round-trips its arguments and result through that format, so a
task behaves as it would under Celery with that serializer (tuples arrive as
lists, an object json cannot encode fails in the caller) and a worker can
refuse a format its ``accept_content`` does not list.
"""
from __future__ import annotations

import json
from typing import Any

from ..errors import SerializationError

NAMES = ("pickle", "json", "msgpack")


def _msgpack():
    try:
        import msgpack
    except ImportError:
        raise SerializationError("the msgpack serializer needs the msgpack package: "
                                 "pip install msgpack") from None
    return msgpack


def encode(serializer: str, value: Any, what: str) -> Any:
    """value as it travels under serializer; a value it cannot encode fails here, naming what."""
    if serializer == "pickle":
        return value
    try:
        if serializer == "json":
            return json.dumps(value)
        if serializer == "msgpack":
            return _msgpack().packb(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise SerializationError(f"{what} cannot be sent with the {serializer} serializer: {e}; "
                                 "use serializer='pickle'") from None
    raise ValueError(f"unknown serializer {serializer!r}: use one of {', '.join(NAMES)}")


def decode(serializer: str, data: Any) -> Any:
    """The value encode() made into data."""
    if serializer == "json":
        return json.loads(data)
    if serializer == "msgpack":
        return _msgpack().unpackb(data)
    return data
