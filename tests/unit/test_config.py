"""Settings: defaults, what each WARMER_* variable accepts, and that passwords never show."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest

from warmer.config import (
    SETTINGS,
    Config,
    ConfigError,
    mask_password,
    settings_help,
    unknown_settings,
)
from warmer.core.policy import Policy, Prices


def test_an_empty_environment_gives_the_documented_defaults() -> None:
    config = Config.from_env({}, isatty=False)

    assert config == Config()
    assert config.amqp_url == "amqp://guest:guest@localhost:5672/"
    assert config.namespace == "warmer"
    assert config.store == "sqlite:///warmer.db"
    assert config.prefetch == 256
    assert config.log_format == "json"
    assert config.log_level == "info"
    assert config.warm_timeout_ms == 60_000
    assert config.max_failures == 3
    assert config.idle_max_ms == 2_700_000
    assert config.idle_max_warms == 10
    assert config.http == "off"


@pytest.mark.parametrize(("isatty", "expected"), [(True, "console"), (False, "json")])
def test_log_format_defaults_to_console_on_a_terminal_else_json(
    isatty: bool, expected: str
) -> None:
    assert Config.from_env({}, isatty=isatty).log_format == expected


@pytest.mark.parametrize(("isatty", "chosen"), [(True, "json"), (False, "console")])
def test_an_explicit_log_format_wins_over_the_terminal_default(isatty: bool, chosen: str) -> None:
    config = Config.from_env({"WARMER_LOG_FORMAT": chosen}, isatty=isatty)

    assert config.log_format == chosen


def test_settings_cover_every_config_field_once() -> None:
    fields = [f.name for f in msgspec.structs.fields(Config)]

    assert sorted(s.field for s in SETTINGS) == sorted(fields)
    assert all(s.name == "WARMER_" + s.field.upper() for s in SETTINGS)


def test_documented_defaults_parse_to_the_config_defaults() -> None:
    # The log format's and the replica id's defaults depend on the terminal and the host.
    environ = {s.name: s.default for s in SETTINGS if s.field not in ("log_format", "replica_id")}

    assert Config.from_env(environ, isatty=False) == Config()


VALID = [
    ("WARMER_AMQP_URL", "amqps://user:pw@rabbit.internal:5671/prod", "amqp_url"),
    ("WARMER_AMQP_URL", "amqp://rabbit/", "amqp_url"),
    ("WARMER_NAMESPACE", "team-a.warmer_2", "namespace"),
    ("WARMER_STORE", "sqlite:///relative.db", "store"),
    ("WARMER_STORE", "sqlite:////var/lib/warmer/state.db", "store"),
    ("WARMER_STORE", "memory://", "store"),
    ("WARMER_STORE", "redis://cache:6379/0", "store"),
    ("WARMER_STORE", "postgresql://warmer@db:5432/warmer?schema=team_a", "store"),
    ("WARMER_SHARDS", "16", "shards"),
    ("WARMER_REPLICA_ID", "warmer-0", "replica_id"),
    ("WARMER_PREFETCH", "1", "prefetch"),
    ("WARMER_PREFETCH", "65535", "prefetch"),
    ("WARMER_LOG_LEVEL", "debug", "log_level"),
    ("WARMER_LOG_LEVEL", "error", "log_level"),
    ("WARMER_WARM_TIMEOUT_MS", "1000", "warm_timeout_ms"),
    ("WARMER_MAX_FAILURES", "1", "max_failures"),
    ("WARMER_IDLE_MAX_MS", "1000", "idle_max_ms"),
    ("WARMER_IDLE_MAX_WARMS", "1", "idle_max_warms"),
    ("WARMER_HTTP", "off", "http"),
    ("WARMER_HTTP", "127.0.0.1:8080", "http"),
    ("WARMER_HTTP", "0.0.0.0:9090", "http"),
    ("WARMER_HEARTBEAT_S", "1", "heartbeat_s"),
    ("WARMER_HEARTBEAT_S", "3600", "heartbeat_s"),
    ("WARMER_STARTUP_WAIT_S", "0", "startup_wait_s"),
    ("WARMER_STARTUP_WAIT_S", "86400", "startup_wait_s"),
    ("WARMER_STALL_S", "1", "stall_s"),
    ("WARMER_HTTP", "localhost:0", "http"),
    ("WARMER_HTTP", "[::1]:65535", "http"),
]


@pytest.mark.parametrize(("name", "raw", "field"), VALID)
def test_each_setting_accepts_a_valid_value(name: str, raw: str, field: str) -> None:
    value = getattr(Config.from_env({name: raw}), field)

    assert str(value) == raw


@pytest.mark.parametrize(
    ("name", "raw", "field", "expected"),
    [
        ("WARMER_LOG_LEVEL", "WARNING", "log_level", "warning"),
        ("WARMER_LOG_FORMAT", "Console", "log_format", "console"),
        ("WARMER_HTTP", "OFF", "http", "off"),
    ],
)
def test_choices_are_case_insensitive(name: str, raw: str, field: str, expected: str) -> None:
    assert getattr(Config.from_env({name: raw}), field) == expected


INVALID = [
    ("WARMER_AMQP_URL", "http://rabbit:5672/", "amqp:// or amqps://"),
    ("WARMER_AMQP_URL", "rabbit:5672", "amqp:// or amqps://"),
    ("WARMER_AMQP_URL", "amqp://", "amqp:// or amqps://"),
    ("WARMER_AMQP_URL", "amqp://rabbit:notaport/", "amqp:// or amqps://"),
    ("WARMER_AMQP_URL", "amqp://rabbit:99999/", "amqp:// or amqps://"),
    ("WARMER_NAMESPACE", "", "letters, digits"),
    ("WARMER_NAMESPACE", "team a", "letters, digits"),
    ("WARMER_NAMESPACE", "warmer/x", "letters, digits"),
    ("WARMER_NAMESPACE", "warmer\n", "letters, digits"),
    ("WARMER_NAMESPACE", "x" * 101, "1 to 100 characters"),
    ("WARMER_STORE", "mongodb://db/warmer", "sqlite:///<path>"),
    ("WARMER_STORE", "sqlite://", "sqlite:///<path>"),
    ("WARMER_STORE", "memory://extra", "memory://"),
    ("WARMER_STORE", "warmer.db", "sqlite:///<path>"),
    ("WARMER_PREFETCH", "abc", "an integer from 1 to 65535"),
    ("WARMER_PREFETCH", "0", "an integer from 1 to 65535"),
    ("WARMER_PREFETCH", "65536", "an integer from 1 to 65535"),
    ("WARMER_PREFETCH", "-1", "an integer from 1 to 65535"),
    ("WARMER_PREFETCH", " 10", "an integer from 1 to 65535"),
    ("WARMER_PREFETCH", "1e3", "an integer from 1 to 65535"),
    ("WARMER_PREFETCH", "1_000", "an integer from 1 to 65535"),
    ("WARMER_PREFETCH", "", "an integer from 1 to 65535"),
    ("WARMER_HEARTBEAT_S", "0", "an integer from 1 to 3600 (seconds)"),
    ("WARMER_HEARTBEAT_S", "3601", "an integer from 1 to 3600 (seconds)"),
    ("WARMER_STARTUP_WAIT_S", "-1", "an integer from 0 to 86400 (seconds)"),
    ("WARMER_STALL_S", "0", "an integer from 1 to 3600 (seconds)"),
    ("WARMER_LOG_FORMAT", "text", "one of json, console"),
    ("WARMER_LOG_LEVEL", "trace", "one of debug, info, warning, error"),
    ("WARMER_LOG_LEVEL", "critical", "one of debug, info, warning, error"),
    ("WARMER_WARM_TIMEOUT_MS", "999", "an integer from 1000"),
    ("WARMER_WARM_TIMEOUT_MS", "60s", "an integer from 1000"),
    ("WARMER_WARM_TIMEOUT_MS", "9" * 17, "an integer from 1000"),
    ("WARMER_MAX_FAILURES", "0", "an integer from 1"),
    ("WARMER_MAX_FAILURES", "3.0", "an integer from 1"),
    ("WARMER_IDLE_MAX_MS", "10", "an integer from 1000"),
    ("WARMER_IDLE_MAX_WARMS", "0", "an integer from 1"),
    ("WARMER_HTTP", "on", "off, or host:port such as 127.0.0.1:8080"),
    ("WARMER_HTTP", "8080", "off, or host:port"),
    ("WARMER_HTTP", ":8080", "off, or host:port"),
    ("WARMER_HTTP", "0.0.0.0", "off, or host:port"),
    ("WARMER_HTTP", "0.0.0.0:65536", "a port from 0 to 65535"),
    ("WARMER_HTTP", "0.0.0.0:http", "off, or host:port"),
    ("WARMER_HTTP", "http://0.0.0.0:8080", "off, or host:port"),
    ("WARMER_HTTP", "::1:8080", "off, or host:port"),
]


@pytest.mark.parametrize(("name", "raw", "allowed"), INVALID)
def test_an_invalid_value_is_one_line_naming_setting_value_and_what_is_allowed(
    name: str, raw: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({name: raw})

    message = str(caught.value)
    assert message.startswith(f"{name}={raw!r} is not valid: expected ")
    assert allowed in message
    assert "\n" not in message


def test_the_prefetch_message_reads_exactly_as_documented() -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"WARMER_PREFETCH": "abc"})

    assert str(caught.value) == (
        "WARMER_PREFETCH='abc' is not valid: expected an integer from 1 to 65535"
    )


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://guest:guest@localhost:5672/", "amqp://guest:***@localhost:5672/"),
        ("amqps://app:s3cr3t@rabbit:5671/prod", "amqps://app:***@rabbit:5671/prod"),
        ("amqp://rabbit:5672/", "amqp://rabbit:5672/"),
        ("amqp://app@rabbit/", "amqp://app@rabbit/"),
        ("amqp://:s3cr3t@rabbit/", "amqp://:***@rabbit/"),
        ("amqp://app:p%40ss@rabbit/vh", "amqp://app:***@rabbit/vh"),
        ("amqp://app:p@ss@rabbit/", "amqp://app:***@rabbit/"),
        ("amqp://app:pa/ss@rabbit/", "amqp://app:***@rabbit/"),
        ("redis://:s3cr3t@cache:6379/0", "redis://:***@cache:6379/0"),
        ("app:s3cr3t@rabbit", "app:***@rabbit"),
    ],
)
def test_mask_password_hides_only_the_password(url: str, masked: str) -> None:
    assert mask_password(url) == masked


def test_the_config_offers_the_broker_url_masked() -> None:
    config = Config.from_env({"WARMER_AMQP_URL": "amqps://app:s3cr3t@rabbit:5671/prod"})

    assert config.amqp_url == "amqps://app:s3cr3t@rabbit:5671/prod"
    assert config.amqp_url_masked == "amqps://app:***@rabbit:5671/prod"


def test_repr_and_log_fields_never_show_a_password() -> None:
    config = Config.from_env(
        {
            "WARMER_AMQP_URL": "amqp://app:s3cr3t@rabbit/",
            "WARMER_STORE": "redis://:r3d1s@cache:6379/0",
        }
    )

    assert "s3cr3t" not in repr(config)
    assert "r3d1s" not in repr(config)
    assert "amqp://app:***@rabbit/" in repr(config)
    fields = config.as_log_fields()
    assert fields["amqp_url"] == "amqp://app:***@rabbit/"
    assert fields["store"] == "redis://:***@cache:6379/0"
    assert fields["prefetch"] == 256
    assert set(fields) == {f.name for f in msgspec.structs.fields(Config)}


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("WARMER_AMQP_URL", "http://app:s3cr3t@rabbit/"),
        ("WARMER_AMQP_URL", "amqp://app:s3cr3t@rabbit:bad/"),
        ("WARMER_AMQP_URL", "amqp://app:s3/cr3t@rabbit/"),
        ("WARMER_STORE", "mongodb://:s3cr3t@db/0"),
    ],
)
def test_an_invalid_url_is_reported_without_its_password(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({name: raw})

    message = str(caught.value)
    assert message.startswith(f"{name}='")
    assert "***" in message
    assert "s3cr3t" not in message
    assert "s3/cr3t" not in message


def test_a_huge_invalid_value_is_shortened_in_the_message() -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"WARMER_WARM_TIMEOUT_MS": "9" * 5000})

    message = str(caught.value)
    assert message.startswith("WARMER_WARM_TIMEOUT_MS='" + "9" * 100)
    assert "...' is not valid: expected an integer from 1000" in message
    assert len(message) < 400


def test_the_first_invalid_setting_stops_and_valid_ones_are_not_blamed() -> None:
    with pytest.raises(ConfigError, match=r"^WARMER_MAX_FAILURES="):
        Config.from_env({"WARMER_PREFETCH": "10", "WARMER_MAX_FAILURES": "none"})


def test_the_config_is_frozen() -> None:
    config = Config()

    with pytest.raises(AttributeError):
        config.prefetch = 1  # type: ignore[misc]


def test_unknown_warmer_variables_are_reported_sorted() -> None:
    environ = {"WARMER_PREFECH": "1", "WARMER_PREFETCH": "1", "WARMER_AAA": "x", "HOME": "/"}

    assert unknown_settings(environ) == ["WARMER_AAA", "WARMER_PREFECH"]


def test_settings_help_names_every_variable_with_its_default() -> None:
    text = settings_help()

    for setting in SETTINGS:
        assert setting.name in text
        assert f"default: {setting.default}" in text
    assert "console on a terminal, json otherwise" in text


@pytest.mark.parametrize(
    ("raw", "address"),
    [
        ("off", None),
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::]:9090", ("::", 9090)),
    ],
)
def test_the_http_setting_reads_as_a_host_and_port_or_none(
    raw: str, address: tuple[str, int] | None
) -> None:
    assert Config.from_env({"WARMER_HTTP": raw}).http_address == address


# -- the rules' knobs: built here, handed down to the core ----------------------------------


def test_the_default_settings_set_the_cores_default_policy() -> None:
    assert Config.from_env({}).policy() == Policy()


def test_each_rule_setting_reaches_the_policy() -> None:
    environ = {
        "WARMER_WARM_TIMEOUT_MS": "5000",
        "WARMER_MAX_FAILURES": "4",
        "WARMER_IDLE_MAX_MS": "600000",
        "WARMER_IDLE_MAX_WARMS": "7",
        "WARMER_CACHE_TTL_MS": "3600000",
        "WARMER_RETENTION_MS": "86400000",
        "WARMER_COST_POLICY": "adaptive",
        "WARMER_TTL_MARGIN_MS": "30000",
        "WARMER_MIN_PREFIX_TOKENS": "2048",
        "WARMER_MAX_MISSES": "5",
        "WARMER_SPEND_CAP_TOKENS": "9",
        "WARMER_PRICE_READ": "0.5",
        "WARMER_PRICE_WRITE_5M": "1.5",
        "WARMER_PRICE_WRITE_1H": "3",
        "WARMER_PRICE_OUTPUT": "4",
    }

    policy = Config.from_env(environ).policy()

    assert policy == Policy(
        warm_timeout_ms=5000,
        max_failures=4,
        idle_max_ms=600_000,
        idle_max_warms=7,
        cache_ttl_ms=3_600_000,
        retention_ms=86_400_000,
        cost_policy="adaptive",
        ttl_margin_ms=30_000,
        min_prefix_tokens=2048,
        max_misses=5,
        spend_cap_tokens=9,
        prices=Prices(read=0.5, write_5m=1.5, write_1h=3.0, output=4.0),
    )


def test_the_core_does_not_import_the_config() -> None:
    # The edge builds what the core needs and hands it down (STYLE.md).
    code = "import sys, warmer.core; print('warmer.config' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
