"""The wire contract, version 1, in code: every message as a msgspec Struct.

Limits are enforced by the types (``Meta`` constraints) wherever msgspec can; the
one limit it cannot express, the 200-byte ``conversationId``, is checked by
``__post_init__``, which msgspec reports as an ordinary validation error.
Each inbound stream has one decoder, built once; ``decode_event`` and
``decode_command`` turn bytes into a message, an ``UnknownType`` or a ``Rejection``
and never raise, whatever the input: nesting is bounded before the decoder runs, and
every error text is bounded however long the value it quotes.
"""

from __future__ import annotations

import enum
import re
import reprlib
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType, field

MAX_BODY_BYTES: Final = 64 * 1024
MAX_SAFE_INTEGER: Final = 2**53 - 1
MAX_ID_BYTES: Final = 200
MAX_ERROR_CHARS: Final = 500

ConversationId = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_ID_BYTES,
        # C0, DEL and C1: Unicode's control characters (category Cc).
        pattern=r"^[^\x00-\x1f\x7f-\x9f]+$",
        description="1 to 200 bytes of UTF-8, no control characters",
    ),
]
Count = Annotated[int, Meta(ge=0, le=MAX_SAFE_INTEGER)]
EpochMs = Annotated[int, Meta(ge=0, le=MAX_SAFE_INTEGER, description="epoch milliseconds")]
Token = Annotated[int, Meta(ge=1, le=MAX_SAFE_INTEGER)]
CacheTtlS = Annotated[
    int,
    Meta(
        ge=0,
        le=MAX_SAFE_INTEGER // 1000,
        description="seconds; in milliseconds still a safe integer",
    ),
]
Cwd = Annotated[str, Meta(max_length=4096)]
ModelName = Annotated[str, Meta(max_length=256)]
ErrorText = Annotated[str, Meta(min_length=1)]


class _Message(Struct, frozen=True, kw_only=True, rename="camel", tag_field="type"):
    """Base of every tagged message: camelCase fields, the tag in ``type``."""


class _Addressed(_Message, frozen=True, kw_only=True):
    """A message about one conversation."""

    conversation_id: ConversationId

    def __post_init__(self) -> None:
        # msgspec's pattern is searched with `re`, whose `$` also matches before a final
        # newline: the one control character the pattern lets through.
        if self.conversation_id.endswith("\n"):
            raise ValueError("conversationId: Expected `str` with no control characters")
        if len(self.conversation_id.encode()) > MAX_ID_BYTES:
            raise ValueError(f"conversationId: longer than {MAX_ID_BYTES} bytes of UTF-8")


# -- inbound: lifecycle events ------------------------------------------------------


class Usage(Struct, frozen=True, kw_only=True, rename="camel"):
    """Token usage of one provider request; ``input_tokens`` counts cache reads and writes."""

    input_tokens: Count
    cache_read_tokens: Count
    cache_write_tokens: Count
    output_tokens: Count | None = None
    cache_write_5m_tokens: Count | None = field(default=None, name="cacheWrite5mTokens")
    cache_write_1h_tokens: Count | None = field(default=None, name="cacheWrite1hTokens")


class TurnStarted(_Addressed, frozen=True, kw_only=True, tag="turn.started"):
    """The conversation began generating a turn."""

    seq: Count | None = None
    at: EpochMs | None = None


class TurnSettled(_Addressed, frozen=True, kw_only=True, tag="turn.settled"):
    """The turn finished; the conversation is idle."""

    cwd: Cwd | None = None
    model_name: ModelName | None = None
    last_request_at: EpochMs | None = None
    seq: Count | None = None
    at: EpochMs | None = None
    usage: Usage | None = None
    cache_ttl_s: CacheTtlS | None = field(default=None, name="cacheTtlS")
    prefix_tokens: Count | None = None


class WarmCompleted(_Addressed, frozen=True, kw_only=True, tag="warm.completed"):
    """A warm finished: ``error`` (which wins when both are given) or ``usage``."""

    token: Token | None = None
    usage: Usage | None = None
    error: ErrorText | None = None
    at: EpochMs | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.usage is None and self.error is None:
            raise ValueError("usage or error: neither is present")


class ConversationClosed(_Addressed, frozen=True, kw_only=True, tag="conversation.closed"):
    """The user closed the conversation (not a disconnect)."""

    seq: Count | None = None
    at: EpochMs | None = None


LifecycleEvent = TurnStarted | TurnSettled | WarmCompleted | ConversationClosed

# -- inbound: commands --------------------------------------------------------------


class SetEnabled(_Addressed, frozen=True, kw_only=True, tag="set_enabled"):
    """Opt a conversation in or out of warming."""

    enabled: bool


class SetInterval(_Addressed, frozen=True, kw_only=True, tag="set_interval"):
    """Set the warm interval; any JSON number is clamped, never refused."""

    interval_ms: int | float


CostPolicyName = Literal["fixed", "budget", "adaptive"]
"""How warming is judged (docs/economics.md): the interval and idle budget only, also a
spend cap per idle stretch, or only while the expected saving is positive."""


class SetPolicy(_Addressed, frozen=True, kw_only=True, tag="set_policy"):
    """Override the deployment's cost policy for one conversation; null restores it."""

    policy: CostPolicyName | None


class GetState(_Addressed, frozen=True, kw_only=True, tag="get_state"):
    """Ask for a conversation's state and panel; changes nothing."""


class SurfaceAction(_Addressed, frozen=True, kw_only=True, tag="surface.action"):
    """A dashboard acting on the panel it was given; ``payload`` depends on the action."""

    action_id: str
    payload: Any = UNSET


Command = SetEnabled | SetInterval | SetPolicy | GetState | SurfaceAction

# -- outbound -----------------------------------------------------------------------


class WarmRequested(_Message, frozen=True, kw_only=True, tag="warm.requested"):
    """Asks whoever holds the prompt prefix to re-send it, reading the cache."""

    conversation_id: str
    token: int
    requested_at: int
    cwd: str | UnsetType = UNSET
    model_name: str | UnsetType = UNSET


class Status(enum.StrEnum):
    """A conversation's status (docs/semantics.md); on the wire, its value.

    The core keeps a conversation's schedule in the same type (``Conversation.phase``,
    one of the last seven): one representation of the concept, not strings beside an enum.
    Later versions may add values; dashboards show unknown ones as they are.
    """

    DISABLED = "disabled"
    ACTIVE = "active"
    IDLE = "idle"
    ARMED = "armed"
    WARMING = "warming"
    RETRYING = "retrying"
    PAUSED = "paused"
    BUDGET_EXHAUSTED = "budget_exhausted"
    EXPIRED = "expired"
    """The cache expired before a warm could reach it; the next turn arms again."""

    @property
    def pending(self) -> bool:
        """True when a timer (regular warm, retry or warm timeout) is pending."""
        return self in _PENDING


_PENDING: Final = frozenset({Status.ARMED, Status.WARMING, Status.RETRYING})


class StateView(Struct, frozen=True, kw_only=True, rename="camel"):
    """A conversation's state as dashboards and ``get_state`` see it."""

    enabled: bool
    interval_ms: int
    active: bool
    status: Status
    last_pct: int | None
    last_expected_pct: int | None
    last_warm_at: int | None
    next_warm_at: int | None
    last_error: str | None
    failures: int


class ActionRef(Struct, frozen=True, rename="camel"):
    """The action a panel field triggers, as ``surface.action``'s ``actionId``."""

    action_id: str


class _PanelField(Struct, frozen=True, kw_only=True, rename="camel", tag_field="kind"):
    """Base of the panel's field kinds."""


class ToggleField(_PanelField, frozen=True, kw_only=True, tag="toggle"):
    """An on/off switch."""

    label: str
    value: bool
    action: ActionRef


class NumberField(_PanelField, frozen=True, kw_only=True, tag="number"):
    """A number input."""

    label: str
    value: int
    min: int
    step: int
    unit: str
    action: ActionRef


class StatField(_PanelField, frozen=True, kw_only=True, tag="stat"):
    """A read-only figure."""

    label: str
    value: str


class TimerPayload(Struct, frozen=True, kw_only=True, rename="camel"):
    """What the countdown renderer needs."""

    next_warm_at: int | None
    last_warm_at: int | None


class CustomField(_PanelField, frozen=True, kw_only=True, tag="custom"):
    """A field drawn by a named renderer of the dashboard."""

    renderer_id: str
    payload: TimerPayload


PanelField = ToggleField | NumberField | StatField | CustomField


class Panel(Struct, frozen=True, kw_only=True):
    """The panel (``spec``) a dashboard renders for a conversation."""

    id: str
    region: str
    title: str
    fields: list[PanelField]


class SurfaceChanged(_Message, frozen=True, kw_only=True, tag="surface.changed"):
    """A conversation's state and panel changed."""

    conversation_id: str
    state: StateView
    spec: Panel
    at: int


class SettingsView(Struct, frozen=True, kw_only=True, rename="camel"):
    """A conversation's persisted settings, as replies show them.

    ``policy`` is shown only for a conversation that overrides the deployment's.
    """

    enabled: bool
    interval_ms: int
    policy: CostPolicyName | UnsetType = UNSET


class SettingsReply(Struct, frozen=True, kw_only=True):
    """Reply to ``set_enabled``, ``set_interval`` and the actions standing for them."""

    ok: Literal[True] = True
    settings: SettingsView


class StateReply(Struct, frozen=True, kw_only=True):
    """Reply to ``get_state``."""

    ok: Literal[True] = True
    state: StateView
    spec: Panel


ErrorCode = Literal[
    "invalid_content_type",
    "invalid_properties",
    "too_large",
    "invalid_json",
    "invalid_field",
    "invalid_payload",
    "unknown_action",
    "unknown_type",
    "store_error",
]


class ErrorReply(Struct, frozen=True, kw_only=True):
    """Reply to a command that could not be applied; it changed nothing.

    ``error`` is cut to ``MAX_ERROR_CHARS`` characters however it was built.
    """

    ok: Literal[False] = False
    error: str
    code: ErrorCode

    def __post_init__(self) -> None:
        if len(self.error) > MAX_ERROR_CHARS:
            msgspec.structs.force_setattr(self, "error", _cut(self.error, MAX_ERROR_CHARS))


Reply = SettingsReply | StateReply | ErrorReply

# -- decoding -----------------------------------------------------------------------

# Codes for a message that fails the encoding rules: dead-lettered even when a command.
ENCODING_CODES: Final = frozenset(
    {"invalid_content_type", "invalid_properties", "too_large", "invalid_json"}
)
# Arrays and objects open at once at most; the top-level object is depth 1.
MAX_DEPTH: Final = 32
# A value quoted in an error, and an unknown type shown in a log: either can be as
# long as the body.
_QUOTED_CHARS: Final = 200
_SHOWN_TYPE_CHARS: Final = 64
_PLAIN_ENCODINGS: Final = frozenset({"", "identity", "utf-8"})


class Rejection(Struct, frozen=True):
    """Why an inbound message cannot be applied: a contract error code and one line.

    ``error`` is cut to ``MAX_ERROR_CHARS`` characters however it was built, so it can go
    into a header, a reply or a log as it is.
    """

    code: ErrorCode
    error: str

    def __post_init__(self) -> None:
        if len(self.error) > MAX_ERROR_CHARS:
            msgspec.structs.force_setattr(self, "error", _cut(self.error, MAX_ERROR_CHARS))

    @property
    def dead_letter_always(self) -> bool:
        """True when the message fails the encoding rules (dead-lettered even as a command)."""
        return self.code in ENCODING_CODES


class UnknownType(Struct, frozen=True):
    """A well-formed message whose ``type`` this worker does not know.

    ``type`` is the value as sent, up to the size of the body: log ``shown`` instead.
    """

    type: str

    @property
    def shown(self) -> str:
        """``type`` cut to at most 64 characters (with an ellipsis), for logs."""
        return _cut(self.type, _SHOWN_TYPE_CHARS)


_T = TypeVar("_T")
_EVENT_DECODER: Final = msgspec.json.Decoder(LifecycleEvent)
_COMMAND_DECODER: Final = msgspec.json.Decoder(Command)
_ENCODER: Final = msgspec.json.Encoder()
_PATH = re.compile(r" - at `\$\.?(.*)`$")
# A JSON string as the parser reads it. An unterminated one runs to the end of the text:
# requiring its closing quote would make the scan quadratic, the search for that quote
# starting again at every later (escaped) quote.
_STRING: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_REPR: Final = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 40, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 4


def encode(message: Struct) -> bytes:
    """Encode an outbound message (or reply) as JSON."""
    return _ENCODER.encode(message)


def decode_event(
    body: bytes, content_type: str | None = None, *, content_encoding: str | None = None
) -> LifecycleEvent | UnknownType | Rejection:
    """Decode a lifecycle event (with its AMQP content type and encoding); never raises."""
    return _decode(_EVENT_DECODER, body, content_type, content_encoding)


def decode_command(
    body: bytes, content_type: str | None = None, *, content_encoding: str | None = None
) -> Command | UnknownType | Rejection:
    """Decode a command (with its AMQP content type and encoding); never raises."""
    return _decode(_COMMAND_DECODER, body, content_type, content_encoding)


def is_json_content_type(content_type: str | None) -> bool:
    """True for an absent content type or ``application/json`` with any parameters."""
    if not content_type or content_type == "application/json":
        return True
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def _nested_too_deep(text: str) -> bool:
    """True when the JSON ``text`` nests arrays and objects more than ``MAX_DEPTH`` deep.

    The depth at a point is the number of arrays and objects open there: a scalar is
    at depth 0, the top-level object at depth 1, and ``{"a": [1]}`` reaches depth 2.
    Brackets inside strings do not count (an unterminated string runs to the end, as
    for the parser). On malformed text the count agrees with the parser up to its first
    error, where it stops, so the decoder never nests deeper than counted here. Linear
    in the size of the text: one regular expression removes the strings.
    """
    outside = _STRING.sub("", text)
    if outside.count("[") + outside.count("{") <= MAX_DEPTH:
        return False
    depth = 0
    for char in outside:
        if char == "[" or char == "{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif char == "]" or char == "}":
            depth -= 1
    return False


_LOOSE_DECODER: Final = msgspec.json.Decoder(float_hook=float)
"""Any JSON as ``JSON.parse`` reads it: the last of a duplicated key wins, and a number
beyond a double's range is infinite (``float`` of its text), never an error."""


def _decode(
    decoder: msgspec.json.Decoder[_T],
    body: bytes,
    content_type: str | None,
    content_encoding: str | None,
) -> _T | UnknownType | Rejection:
    if not is_json_content_type(content_type):
        return Rejection("invalid_content_type", f"content type {quoted(content_type)} is not JSON")
    if content_encoding and content_encoding.strip().lower() not in _PLAIN_ENCODINGS:
        return Rejection(
            "invalid_content_type",
            f"content encoding {quoted(content_encoding)} is not identity or utf-8:"
            " a compressed body is not read",
        )
    if len(body) > MAX_BODY_BYTES:
        return Rejection("too_large", f"body is {len(body)} bytes, over the {MAX_BODY_BYTES}")
    try:
        # Decoding to str first checks the whole body is UTF-8: msgspec skips the
        # bytes of fields it ignores without looking at them.
        text = body.decode()
    except UnicodeDecodeError as exc:
        return Rejection("invalid_json", f"body is not UTF-8: {exc.reason} at byte {exc.start}")
    # msgspec recurses once per level, skipped fields included: decide the depth before
    # it runs. At most MAX_DEPTH openers in all (nearly every body) cannot be too deep.
    # One count of `{` after `replace` (which finds no `[` in most bodies and then
    # returns the body itself) costs half of counting both.
    if body.replace(b"[", b"{").count(b"{") > MAX_DEPTH and _nested_too_deep(text):
        return Rejection("invalid_json", f"body is nested more than {MAX_DEPTH} levels deep")
    try:
        return decoder.decode(text)
    except msgspec.ValidationError:
        return _reread(decoder, text)
    except msgspec.DecodeError as exc:
        return Rejection("invalid_json", f"body is not JSON: {exc}")
    except RecursionError:  # not reached after the depth check: belt and braces
        return Rejection("invalid_json", "body is nested too deep to read")


def _reread(decoder: msgspec.json.Decoder[_T], text: str) -> _T | UnknownType | Rejection:
    """The slow path, taken when the typed decoder refused the body: read it again as
    ``JSON.parse`` would, then convert it, telling an unknown type, a non-object and a bad
    field apart.

    The typed decoder reads a body as it streams, so it refuses what ``JSON.parse`` reads
    without complaint: a key given twice whose first value is wrong (a second ``type``
    above all: the tag is checked against the first), and a number beyond a double's
    range (``1e400``, which the contract clamps). Read as a plain value first, the last of
    a duplicated key wins and such a number is infinite; converting that value to the
    message type then refuses exactly what is wrong with the message as read.
    """
    try:
        value = _loose(text)
    except msgspec.DecodeError as exc:  # malformed after where the typed decoder stopped
        return Rejection("invalid_json", f"body is not JSON: {exc}")
    except RecursionError:  # not reached after the depth check: belt and braces
        return Rejection("invalid_json", "body is nested too deep to read")
    if not isinstance(value, dict):
        return Rejection("invalid_json", "body is not a JSON object")
    kind = value.get("type")
    if kind is None:
        return Rejection("invalid_field", "type: missing or null")
    if not isinstance(kind, str):
        return Rejection("invalid_field", f"type: expected a string, got {quoted(kind)}")
    try:
        message: _T = msgspec.convert(value, decoder.type)
    except msgspec.ValidationError as exc:
        problem = str(exc)
        if problem.endswith("- at `$.type`"):
            return UnknownType(kind)
        return Rejection("invalid_field", f"{_cut(kind, _SHOWN_TYPE_CHARS)}: {_describe(problem)}")
    return message


def _loose(text: str) -> Any:
    """``text`` read by the loose decoder, an integer literal beyond a double as infinite.

    Python reads an integer of more than 4300 digits only as an error (CPython's limit on
    int-from-text, which msgspec hits): such a literal, far beyond a double's range, is
    read again as ``1e400`` is (JSON.parse reads both as Infinity). Only after that error,
    and only whole integer literals outside strings, so the slow path stays as it was for
    every other body and a malformed number (a leading zero, a fraction) stays malformed.
    """
    try:
        return _LOOSE_DECODER.decode(text)
    except msgspec.DecodeError as exc:
        if not str(exc).startswith("Integer value out of range"):
            raise
        try:
            return _LOOSE_DECODER.decode(_HUGE_INTEGER.sub(_as_infinite, text))
        except msgspec.DecodeError:
            raise exc from None


# A JSON string (skipped, as it is), or an integer literal of 400 digits or more (beyond
# 1.8e308): not inside a number (after a digit, letter, point or sign) nor followed by its
# fraction or exponent (a float, which the float hook reads), with no leading zero, ASCII
# digits only (`\d` also takes other scripts' digits, which would turn malformed text
# into a number).
_HUGE_INTEGER: Final = re.compile(
    rf"({_STRING.pattern})|(?<![\w.+-])(-?)[1-9][0-9]{{399,}}(?![\w.])", re.DOTALL
)


def _as_infinite(match: re.Match[str]) -> str:
    string, sign = match.group(1, 2)
    return string if string is not None else f"{sign}1e400"


def _describe(problem: str) -> str:
    """Rewrite msgspec's message as `field: what was wrong`."""
    # The path is the message's last: a value quoted before it (an enum's) may itself
    # look like " - at `$.enabled`", and must not name another field.
    match = _PATH.search(problem, problem.rfind(" - at `$"))
    if match is None:
        return problem
    what = problem[: match.start()]
    if what.startswith("Expected `str` matching regex"):
        what = "Expected `str` with no control characters"
    return f"{match.group(1) or 'body'}: {what}"


def quoted(value: object) -> str:
    """``repr(value)`` for an error text, at most 200 characters whatever the value.

    A string too long to show whole is cut inside its quotes and followed by its length,
    as in ``'xxxx…' (32000 chars)``; other values are shortened by ``reprlib``.
    """
    if not isinstance(value, str):
        return _cut(_REPR.repr(value), _QUOTED_CHARS)
    shown = repr(value[:_QUOTED_CHARS])  # never the repr of 64 KiB to show 200 characters
    if len(value) <= _QUOTED_CHARS and len(shown) <= _QUOTED_CHARS:
        return shown
    size = f" ({len(value)} chars)"
    room = _QUOTED_CHARS - len(size) - 1  # the ellipsis
    count = room
    shown = repr(value[:count])
    # Escapes make the repr longer than the string: cut the string, never an escape.
    while len(shown) > room:
        count = count * room // len(shown)
        shown = repr(value[:count])
    return f"{shown[:-1]}…{shown[-1]}{size}"


def _cut(text: str, limit: int) -> str:
    """``text`` when it has at most ``limit`` characters, else its start and an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
