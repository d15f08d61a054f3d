"""Bounded JSON: the nesting limit checked before `json.loads`, for every untrusted document.

`json.loads` recurses once per level of arrays and objects and would exhaust the stack near
1,000, so a document from outside (an upload file in the watched directory, an SQS message) is
refused as too deep before it is parsed. This module only measures; each reader words and
counts the refusal its own way.
"""

from __future__ import annotations

import re

__all__ = ["MAX_JSON_DEPTH", "json_depth_exceeds"]

#: Deepest nesting of JSON arrays and objects read: an upload file needs 2 (the labels
#: object), a notification a few more; the parser would exhaust the stack near 1,000.
MAX_JSON_DEPTH = 32

#: A JSON string (brackets inside do not nest; an unterminated one runs to the end, so that
#: no position is scanned twice) or a bracket.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]++|\\.)*+(?:"|\Z)|[\[\]{}]', re.DOTALL)


def json_depth_exceeds(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if arrays and objects nest deeper than `limit` (brackets in strings ignored).

    Cheap and forgiving: malformed JSON is left for the parser to refuse.
    """
    depth = 0
    for token in _JSON_TOKENS.finditer(text):
        bracket = token.group()
        if bracket in ("[", "{"):
            depth += 1
            if depth > limit:
                return True
        elif bracket in ("]", "}"):
            depth -= 1
    return False
