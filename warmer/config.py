"""The worker's settings: read once from the environment into one frozen `Config`.

Nothing else in `warmer` reads `os.environ`; the CLI calls `Config.from_env` at the
edge and hands the result down. Every setting is a `WARMER_*` variable listed in
`SETTINGS`, which also feeds `warmer run --help`.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

import msgspec

from warmer.bus.port import CONFIRM_TIMEOUT_MS
from warmer.contract import CostPolicyName
from warmer.core.policy import Policy, Prices

__all__ = [
    "SETTINGS",
    "Config",
    "ConfigError",
    "Setting",
    "http_address",
    "mask_password",
    "settings_help",
    "unknown_settings",
]

# JSON-safe integer ceiling, the same one the contract uses for times and counts.
_INT_MAX: Final = 2**53 - 1

Namespace = Annotated[str, msgspec.Meta(pattern=r"\A[A-Za-z0-9._-]{1,100}\Z")]
AmqpUrl = Annotated[str, msgspec.Meta(pattern=r"\Aamqps?://.+\Z")]
StoreUrl = Annotated[
    str, msgspec.Meta(pattern=r"\A(sqlite:///.+|rediss?://.+|postgres(ql)?://.+|memory://)\Z")
]
Shards = Annotated[int, msgspec.Meta(ge=1, le=256)]
ReplicaId = Annotated[str, msgspec.Meta(pattern=r"\A[A-Za-z0-9._:-]{0,100}\Z")]
Prefetch = Annotated[int, msgspec.Meta(ge=1, le=65535)]
InFlight = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
LogFormat = Literal["json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
EventLoop = Literal["asyncio", "uvloop"]
Milliseconds = Annotated[int, msgspec.Meta(ge=1000, le=_INT_MAX)]
AtLeastOne = Annotated[int, msgspec.Meta(ge=1, le=_INT_MAX)]
Tokens = Annotated[int, msgspec.Meta(ge=0, le=_INT_MAX)]
# A price relative to the base input price (1.0): Anthropic's read 0.1, writes 1.25 and 2.
PriceRatio = Annotated[float, msgspec.Meta(ge=0, le=1000)]
HeartbeatSeconds = Annotated[int, msgspec.Meta(ge=1, le=3600)]
WaitSeconds = Annotated[int, msgspec.Meta(ge=0, le=86400)]
StallSeconds = Annotated[int, msgspec.Meta(ge=1, le=3600)]
# "off", or host:port: a name or IPv4 address, or an IPv6 one in brackets. The port's range
# is checked by `http_address`, since a pattern cannot say 0..65535 readably.
HttpListen = Annotated[
    str,
    msgspec.Meta(pattern=r"\A(off|([A-Za-z0-9._-]{1,253}|\[[0-9A-Za-z:.%]{2,64}\]):[0-9]{1,5})\Z"),
]


_POLICY: Final = Policy()
"""The rules' knobs are the core's; their settings take the core's defaults."""


class ConfigError(ValueError):
    """A setting is invalid; the message is one line naming it and what is allowed."""


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """Every setting of the worker, validated; build it with `Config.from_env`.

    The defaults equal those of `from_env` on an empty environment (log format: json),
    so tests may build a `Config(...)` directly with only the fields they care about.
    """

    amqp_url: AmqpUrl = "amqp://guest:guest@localhost:5672/"
    namespace: Namespace = "warmer"
    store: StoreUrl = "sqlite:///warmer.db"
    store_timeout_ms: Milliseconds = 2_000
    prefetch: Prefetch = 256
    warms_in_flight: InFlight = 256
    behind_not_ready_s: WaitSeconds = 0
    confirm_timeout_ms: Milliseconds = CONFIRM_TIMEOUT_MS
    log_format: LogFormat = "json"
    log_level: LogLevel = "info"
    warm_timeout_ms: Milliseconds = _POLICY.warm_timeout_ms
    max_failures: AtLeastOne = _POLICY.max_failures
    idle_max_ms: Milliseconds = _POLICY.idle_max_ms
    idle_max_warms: AtLeastOne = _POLICY.idle_max_warms
    cache_ttl_ms: Milliseconds = _POLICY.cache_ttl_ms
    retention_ms: Milliseconds = _POLICY.retention_ms
    http: HttpListen = "off"
    cost_policy: CostPolicyName = _POLICY.cost_policy
    ttl_margin_ms: Milliseconds = _POLICY.ttl_margin_ms
    min_prefix_tokens: Tokens = _POLICY.min_prefix_tokens
    max_misses: AtLeastOne = _POLICY.max_misses
    spend_cap_tokens: AtLeastOne = _POLICY.spend_cap_tokens
    price_read: PriceRatio = _POLICY.prices.read
    price_write_5m: PriceRatio = _POLICY.prices.write_5m
    price_write_1h: PriceRatio = _POLICY.prices.write_1h
    price_output: PriceRatio = _POLICY.prices.output
    heartbeat_s: HeartbeatSeconds = 10
    startup_wait_s: WaitSeconds = 300
    stall_s: StallSeconds = 15
    shards: Shards = 1
    replica_id: ReplicaId = ""
    loop: EventLoop = "asyncio"

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, isatty: bool = False) -> Config:
        """Build the config from `environ` (pure: pass `os.environ` or a dict).

        `isatty` says whether stderr is a terminal; it picks the default log format
        (console on a terminal, json otherwise). Raises `ConfigError` on the first
        invalid setting.
        """
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = environ.get(setting.name)
            if raw is None:
                raw = _default_log_format(isatty) if setting.field == "log_format" else None
            if raw is None:
                continue
            values[setting.field] = _parse(setting, raw)
        return msgspec.convert(values, cls)

    def policy(self) -> Policy:
        """The rules' knobs these settings set, handed down to the core."""
        return Policy(
            warm_timeout_ms=self.warm_timeout_ms,
            max_failures=self.max_failures,
            idle_max_ms=self.idle_max_ms,
            idle_max_warms=self.idle_max_warms,
            cache_ttl_ms=self.cache_ttl_ms,
            retention_ms=self.retention_ms,
            cost_policy=self.cost_policy,
            ttl_margin_ms=self.ttl_margin_ms,
            min_prefix_tokens=self.min_prefix_tokens,
            max_misses=self.max_misses,
            spend_cap_tokens=self.spend_cap_tokens,
            prices=Prices(
                read=self.price_read,
                write_5m=self.price_write_5m,
                write_1h=self.price_write_1h,
                output=self.price_output,
            ),
        )

    @property
    def http_address(self) -> tuple[str, int] | None:
        """Where to serve health and metrics over HTTP: ``(host, port)``, None when off."""
        return http_address(self.http)

    @property
    def amqp_url_masked(self) -> str:
        """The broker URL with its password replaced by `***`, safe to log."""
        return mask_password(self.amqp_url)

    def as_log_fields(self) -> dict[str, str | int | float]:
        """Every setting as key-value pairs for a log event, passwords masked."""
        fields: dict[str, str | int | float] = {}
        for name in self.__struct_fields__:
            value = getattr(self, name)
            fields[name] = mask_password(value) if isinstance(value, str) else value
        return fields

    def __repr__(self) -> str:
        # The default repr would print the broker password.
        args = ", ".join(f"{k}={v!r}" for k, v in self.as_log_fields().items())
        return f"Config({args})"

    def __rich_repr__(self) -> Any:
        """Rich's view of the config, passwords masked like `repr`."""
        yield from self.as_log_fields().items()


class Setting(msgspec.Struct, frozen=True):
    """One `WARMER_*` variable: its name, meaning and what it accepts.

    Its default is the `Config` field's (which takes the rules' knobs from the core's
    `Policy`), unless `shown` describes it in words.
    """

    name: str
    field: str
    meaning: str
    expected: str
    shown: str | None = None

    @property
    def default(self) -> str:
        """The default as `--help` shows it and as the variable would be written."""
        if self.shown is not None:
            return self.shown
        return str(getattr(_DEFAULTS, self.field))


_DEFAULTS: Final = Config()

SETTINGS: Final[tuple[Setting, ...]] = (
    Setting(
        "WARMER_AMQP_URL",
        "amqp_url",
        "the RabbitMQ broker (its password is never logged)",
        "an amqp:// or amqps:// URL such as amqp://user:password@host:5672/vhost",
    ),
    Setting(
        "WARMER_NAMESPACE",
        "namespace",
        "prefix of every exchange and queue name",
        "1 to 100 characters among letters, digits, '.', '_' and '-'",
    ),
    Setting(
        "WARMER_STORE",
        "store",
        "where conversation state is kept: sqlite:///relative.db, "
        "sqlite:////absolute/path.db (embedded: one replica only), redis://host:6379/0 or "
        "postgresql://user@host:5432/db (shared by the replicas of a namespace), or "
        "memory:// (tests only: nothing survives)",
        "a sqlite:///<path>, redis://<host>:<port>/<db>, rediss://..., "
        "postgresql://<user>@<host>:<port>/<db>[?schema=name] or memory:// URL",
    ),
    Setting(
        "WARMER_STORE_TIMEOUT_MS",
        "store_timeout_ms",
        "how long a store call may take before it counts as failed: Redis's answer, or "
        "SQLite's lock held by another process; while the store fails, commands are "
        "answered store_error within about this long",
        f"an integer from 1000 to {_INT_MAX} (milliseconds)",
    ),
    Setting(
        "WARMER_PREFETCH",
        "prefetch",
        "unacknowledged lifecycle events per consumer",
        "an integer from 1 to 65535",
    ),
    Setting(
        "WARMER_WARMS_IN_FLIGHT",
        "warms_in_flight",
        "at most this many timers fired and not yet through the worker (applied, their warm "
        "request confirmed); more that fall due wait in the schedule, due times kept, oldest "
        "first, so an overloaded worker spreads its warms instead of timing them out "
        "(0: no bound)",
        "an integer from 0 to 1000000",
    ),
    Setting(
        "WARMER_BEHIND_NOT_READY_S",
        "behind_not_ready_s",
        "/readyz fails while the worker is more than this many seconds behind (its oldest due "
        "timer, input or unconfirmed warm request); 0: never, /readyz only tells how far "
        "behind on a line of its own",
        "an integer from 0 to 86400 (seconds)",
    ),
    Setting(
        "WARMER_CONFIRM_TIMEOUT_MS",
        "confirm_timeout_ms",
        "how long a publish waits for the broker's confirm, in ms; past it the connection is "
        "judged dead (/readyz reports confirms), dropped and made again, and what was not "
        "acknowledged is delivered again (not while the broker blocks publishers)",
        f"an integer from 1000 to {_INT_MAX} (milliseconds)",
    ),
    Setting(
        "WARMER_LOG_FORMAT",
        "log_format",
        "json (one object per line) or console (for people)",
        "one of json, console",
        shown="console on a terminal, json otherwise",
    ),
    Setting(
        "WARMER_LOG_LEVEL",
        "log_level",
        "the least severe level logged",
        "one of debug, info, warning, error",
    ),
    Setting(
        "WARMER_WARM_TIMEOUT_MS",
        "warm_timeout_ms",
        "how long a warm request waits for its completion, in ms",
        f"an integer from 1000 to {_INT_MAX} (milliseconds)",
    ),
    Setting(
        "WARMER_MAX_FAILURES",
        "max_failures",
        "consecutive failed warms before warming pauses",
        f"an integer from 1 to {_INT_MAX}",
    ),
    Setting(
        "WARMER_IDLE_MAX_MS",
        "idle_max_ms",
        "idleness after which a conversation is no longer warmed, in ms",
        f"an integer from 1000 to {_INT_MAX} (milliseconds)",
    ),
    Setting(
        "WARMER_IDLE_MAX_WARMS",
        "idle_max_warms",
        "warms at most in one idle stretch",
        f"an integer from 1 to {_INT_MAX}",
    ),
    Setting(
        "WARMER_CACHE_TTL_MS",
        "cache_ttl_ms",
        "the provider's cache lifetime, in ms: after a restart, an overdue warm is sent only "
        "if the cache can still be alive",
        f"an integer from 1000 to {_INT_MAX} (milliseconds)",
    ),
    Setting(
        "WARMER_RETENTION_MS",
        "retention_ms",
        "a conversation with no input for this long (7 days) is forgotten, in ms",
        f"an integer from 1000 to {_INT_MAX} (milliseconds)",
    ),
    Setting(
        "WARMER_HTTP",
        "http",
        "where to serve /healthz, /readyz and /metrics (Prometheus) over HTTP: host:port "
        "(127.0.0.1:8080 for this host only, 0.0.0.0:8080 for every interface), or off",
        "off, or host:port such as 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080 "
        "(a port from 0 to 65535; 0 takes any free one)",
    ),
    Setting(
        "WARMER_COST_POLICY",
        "cost_policy",
        "how warming is judged (docs/cost-policy.md): fixed (the interval and the idle budget "
        "only), budget (also WARMER_SPEND_CAP_TOKENS per idle stretch), adaptive (only while "
        "a run of warms is expected to pay, from the idle gaps observed; the idle budget does "
        "not bind it); a conversation may override it (set_policy)",
        "one of fixed, budget, adaptive",
    ),
    Setting(
        "WARMER_TTL_MARGIN_MS",
        "ttl_margin_ms",
        "when a conversation's cache lifetime is known (cacheTtlS, or its usage), it is warmed "
        "this long before the cache would expire, whatever its interval, in ms",
        f"an integer from 1000 to {_INT_MAX} (milliseconds)",
    ),
    Setting(
        "WARMER_MIN_PREFIX_TOKENS",
        "min_prefix_tokens",
        "a known prompt prefix smaller than this is not cached by the provider, so it is "
        "not warmed (0: warm whatever the size)",
        f"an integer from 0 to {_INT_MAX} (tokens)",
    ),
    Setting(
        "WARMER_MAX_MISSES",
        "max_misses",
        "consecutive warms that found the cache gone (a write and no read) before warming "
        "pauses until the next turn",
        f"an integer from 1 to {_INT_MAX}",
    ),
    Setting(
        "WARMER_SPEND_CAP_TOKENS",
        "spend_cap_tokens",
        "the budget policy's spend cap per idle stretch, in base-input-token units "
        "(a warm of a 100,000-token prefix costs about 10,000)",
        f"an integer from 1 to {_INT_MAX}",
    ),
    Setting(
        "WARMER_PRICE_READ",
        "price_read",
        "the price of a cache read, relative to the base input price",
        "a decimal number from 0 to 1000 such as 0.1",
    ),
    Setting(
        "WARMER_PRICE_WRITE_5M",
        "price_write_5m",
        "the price of a cache write that lives 5 minutes, relative to the base input price",
        "a decimal number from 0 to 1000 such as 1.25",
    ),
    Setting(
        "WARMER_PRICE_WRITE_1H",
        "price_write_1h",
        "the price of a cache write that lives 1 hour, relative to the base input price",
        "a decimal number from 0 to 1000 such as 2",
    ),
    Setting(
        "WARMER_PRICE_OUTPUT",
        "price_output",
        "the price of an output token, relative to the base input price",
        "a decimal number from 0 to 1000 such as 5",
    ),
    Setting(
        "WARMER_HEARTBEAT_S",
        "heartbeat_s",
        "the AMQP heartbeat, in seconds: a network path that stops forwarding (no FIN or "
        "RST) is noticed and the connection re-made within about 3 heartbeats plus 3 s "
        "(aiormq's grace); a heartbeat in WARMER_AMQP_URL (?heartbeat=) wins",
        "an integer from 1 to 3600 (seconds)",
    ),
    Setting(
        "WARMER_STARTUP_WAIT_S",
        "startup_wait_s",
        "how long start-up keeps trying to reach the store and the broker, in seconds "
        "(attempts 1, 2, 4 .. 30 s apart; /healthz answers meanwhile), before it exits "
        "with code 69; 0: exit at the first failure. Refused credentials or a missing "
        "vhost exit at once",
        "an integer from 0 to 86400 (seconds)",
    ),
    Setting(
        "WARMER_STALL_S",
        "stall_s",
        "when inputs (deliveries, timers that fell due) wait this long while the pipeline "
        "takes none, /readyz says not ready (stall) until it moves again, in seconds",
        "an integer from 1 to 3600 (seconds)",
    ),
    Setting(
        "WARMER_SHARDS",
        "shards",
        "how many shards the namespace's conversations are split into inside the broker "
        "(the consistent-hash exchange plugin, for more than 1); each shard has one owner "
        "among the replicas, taken over within seconds when it goes. Every replica of a "
        "namespace must give the same number; a multiple of the replicas you expect, such "
        "as 16 for up to 8. Changing it on a namespace in use: warmer reshard",
        "an integer from 1 to 256",
    ),
    Setting(
        "WARMER_REPLICA_ID",
        "replica_id",
        "this replica's name in logs, /readyz, warmer shards and the x-warmer-replica header "
        "of what it publishes; empty: the host name and process id",
        "up to 100 letters, digits and ._:-",
        shown="host name:process id",
    ),
    Setting(
        "WARMER_LOOP",
        "loop",
        "the event loop: asyncio (the standard library's) or uvloop (about a tenth less CPU "
        "per event; needs the uvloop package: pip install 'warmer[uvloop]')",
        "one of asyncio, uvloop",
    ),
)

_FIELD_TYPES: Final[dict[str, Any]] = {f.name: f.type for f in msgspec.structs.fields(Config)}
_DIGITS: Final = re.compile(r"[0-9]{1,16}")  # 16 digits already exceed _INT_MAX
_DECIMAL: Final = re.compile(r"[0-9]{1,6}(\.[0-9]{1,9})?")
_PREFIX: Final = "WARMER_"
_SHOWN_MAX: Final = 200


def settings_help() -> str:
    """The `WARMER_*` variables as a text table for `warmer run --help`."""
    indent = " " * (max(len(s.name) for s in SETTINGS) + 4)
    lines = ["environment variables (an invalid one stops `warmer run` with exit code 2):"]
    for s in SETTINGS:
        first = f"  {s.name}".ljust(len(indent)) + s.meaning
        lines.extend(textwrap.wrap(first, width=88, subsequent_indent=indent))
        lines.append(f"{indent}default: {s.default}")
    return "\n".join(lines)


def unknown_settings(environ: Mapping[str, str]) -> list[str]:
    """Names in `environ` that start with `WARMER_` but are no setting (likely typos)."""
    known = {s.name for s in SETTINGS}
    return sorted(n for n in environ if n.startswith(_PREFIX) and n not in known)


def mask_password(url: str) -> str:
    """`url` with the password of its user info replaced by `***`.

    Deliberately conservative: everything between the first ':' of the user info and
    the last '@' is hidden, so a password holding an unescaped '/', '?', '#' or '@'
    still never shows, even in a URL too malformed to parse.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    if not colon:
        return url
    return f"{scheme}{sep}{user}:***@{hostpart}"


def http_address(value: str) -> tuple[str, int] | None:
    """``host:port`` as ``(host, port)`` (an IPv6 host without its brackets); None for off.

    Raises ``ValueError`` when ``value`` is neither.
    """
    if value == "off":
        return None
    host, colon, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"not off or host:port: {value!r}")
    return host, int(port)


def _http_is_usable(value: str) -> bool:
    try:
        http_address(value)
    except ValueError:
        return False
    return True


def _default_log_format(isatty: bool) -> str:
    return "console" if isatty else "json"


def _parse(setting: Setting, raw: str) -> object:
    """`raw` converted to the field's type, or `ConfigError` naming the setting."""
    value: object = raw
    kind = _FIELD_TYPES[setting.field]
    if _is_int(kind):
        if _DIGITS.fullmatch(raw) is None:
            raise _invalid(setting, raw)
        value = int(raw)
    elif _is_float(kind):
        if _DECIMAL.fullmatch(raw) is None:
            raise _invalid(setting, raw)
        value = float(raw)
    elif _is_literal(kind) or raw.lower() == "off":
        value = raw.lower()
    try:
        parsed = msgspec.convert(value, kind)
    except msgspec.ValidationError:
        raise _invalid(setting, raw) from None
    check = _EXTRA_CHECKS.get(setting.field)
    if check is not None and not check(parsed):
        raise _invalid(setting, raw)
    return parsed


def _invalid(setting: Setting, raw: str) -> ConfigError:
    shown = mask_password(raw)
    if len(shown) > _SHOWN_MAX:  # keep the message one readable line
        shown = shown[:_SHOWN_MAX] + "..."
    return ConfigError(f"{setting.name}={shown!r} is not valid: expected {setting.expected}")


def _is_int(kind: Any) -> bool:
    return getattr(kind, "__origin__", kind) is int


def _is_float(kind: Any) -> bool:
    return getattr(kind, "__origin__", kind) is float


def _is_literal(kind: Any) -> bool:
    return getattr(kind, "__origin__", None) is Literal


def _amqp_url_is_usable(url: str) -> bool:
    """The URL names a host and, if any, a numeric port (the pattern checked the scheme)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return bool(parts.hostname) and (port is None or port > 0)


_EXTRA_CHECKS: Final[dict[str, Callable[[Any], bool]]] = {
    "amqp_url": _amqp_url_is_usable,
    "http": _http_is_usable,
}
