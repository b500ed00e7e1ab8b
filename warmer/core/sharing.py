"""Equal values held once: a million conversations hold a few thousand distinct values.

Decoded records each hold their own copy of every string and number: the same few model
names, the working directories of a few thousand projects, the same intervals, and within
one record the same time in several fields (a warm's completion is its last read and its
last input). A Python int past 256 is an object of 32 bytes and a 30-character string one
of 80: at a million conversations the copies were about 300 MB (BENCHMARKS.md, issue 17).

``Sharing`` hands back the copy it already holds of an equal value. Its tables are
bounded, so input that never repeats a value cannot grow them without end: a full table
starts over (the values already shared stay shared; later ones share with each other).
"""

from __future__ import annotations

import sys
from typing import Final

from warmer.core.state import Conversation

__all__ = ["MAX_SHARED_CHARS", "MAX_SHARED_NUMBERS", "MAX_SHARED_STRINGS", "Sharing"]

MAX_SHARED_STRINGS: Final = 131_072
"""Distinct strings (working directories, model names) held at once."""
MAX_SHARED_CHARS: Final = 8 * 2**20
"""The memory their characters take in all, in bytes (an ASCII character takes one, others
two or four: a string is weighed by ``sys.getsizeof``, so a stream of distinct non-ASCII
working directories cannot hold four times the bound); a working directory may be 4,096
characters long."""
_EMPTY_SIZE: Final = sys.getsizeof("")
MAX_SHARED_NUMBERS: Final = 4_096
"""Distinct intervals and timeouts held at once (a deployment has a handful)."""


class Sharing:
    """Bounded tables of the strings and numbers conversations hold, one copy of each."""

    __slots__ = ("_chars", "_max_chars", "_max_numbers", "_max_strings", "_numbers", "_strings")

    def __init__(
        self,
        max_strings: int = MAX_SHARED_STRINGS,
        max_chars: int = MAX_SHARED_CHARS,
        max_numbers: int = MAX_SHARED_NUMBERS,
    ) -> None:
        self._strings: dict[str, str] = {}
        self._chars = 0
        self._numbers: dict[int, int] = {}
        self._max_strings = max_strings
        self._max_chars = max_chars
        self._max_numbers = max_numbers

    def text(self, value: str | None) -> str | None:
        """The copy held of ``value`` (None stays None)."""
        if value is None:
            return None
        held = self._strings.get(value)
        if held is not None:
            return held
        weight = sys.getsizeof(value) - _EMPTY_SIZE
        if len(self._strings) >= self._max_strings or self._chars + weight > self._max_chars:
            self._strings.clear()
            self._chars = 0
        if weight <= self._max_chars:
            self._strings[value] = value
            self._chars += weight
        return value

    def number(self, value: int) -> int:
        """The copy held of the int ``value``."""
        numbers = self._numbers
        held = numbers.get(value)
        if held is not None:
            return held
        if len(numbers) >= self._max_numbers:
            numbers.clear()
        numbers[value] = value
        return value

    def adopt(self, conv: Conversation) -> None:
        """Make ``conv`` (just decoded) hold shared copies: its strings and intervals
        those held here, and each of its times the same object as an equal one it holds.

        At start this runs once per conversation (a million): the common case, a value
        already held, is looked up inline."""
        strings, numbers = self._strings, self._numbers
        cwd = conv.cwd
        if cwd is not None:
            conv.cwd = strings.get(cwd) or self.text(cwd)
        model = conv.model_name
        if model is not None:
            conv.model_name = strings.get(model) or self.text(model)
        interval = conv.interval_ms
        conv.interval_ms = numbers.get(interval) or self.number(interval)
        timeout = conv.timeout_ms
        conv.timeout_ms = numbers.get(timeout) or self.number(timeout)
        ttl = conv.cache_ttl_ms
        if ttl is not None:
            conv.cache_ttl_ms = numbers.get(ttl) or self.number(ttl)
        # One object for equal times: a completion sets its last warm, last read and last
        # input to the same ``now``, which decoding had made three objects. (Inline, not a
        # call: a million times at start.)
        read = conv.last_read_at
        if read is not None:
            if conv.last_warm_at == read:
                conv.last_warm_at = read
            if conv.published_at == read:
                conv.published_at = read
            if conv.settled_read_at == read:
                conv.settled_read_at = read
            if conv.last_input_at == read:
                conv.last_input_at = read
        last_input = conv.last_input_at
        if conv.idle_since == last_input:
            conv.idle_since = last_input
        if conv.settled_at == last_input:
            conv.settled_at = last_input
        if conv.answered_token == conv.token:
            conv.answered_token = conv.token
