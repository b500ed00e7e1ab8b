"""The verbs that talk to a running worker: parsing, help, exit codes and output.

No broker here: a usage error is found before connecting (the broker URL points at a
closed port, so a verb that connected would exit 69 instead of 2), and the bus is a
fake `Control` where a test needs one. `tests/integration/test_cli_verbs.py` runs the
same verbs against a real worker.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from warmer import control
from warmer.cli import main, parse_interval
from warmer.contract import LifecycleEvent
from warmer.control import DeadLetter, DeadLetters, Kept, Replay

CLOSED_PORT_URL = "amqp://guest:s3cr3t@127.0.0.1:1/"
VERBS = ["state", "enable", "disable", "interval", "policy", "send", "dead", "reshard", "shards"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No WARMER_* from the outer environment; the broker is a port nobody listens on;
    the logging a verb set up is undone (a later test's captured info lines vanished)."""
    for name in list(os.environ):
        if name.startswith("WARMER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WARMER_AMQP_URL", CLOSED_PORT_URL)
    monkeypatch.setenv("WARMER_NAMESPACE", "ops")
    yield
    structlog.reset_defaults()


class FakeControl:
    """What the verbs ask of the bus, answered from canned values; records the calls."""

    def __init__(self) -> None:
        self.reply: dict[str, Any] = {"ok": True, "settings": {"enabled": True, "intervalMs": 1}}
        self.error: Exception | None = None
        self.calls: list[tuple[str, object]] = []
        self.commands: list[tuple[dict[str, Any], float, bool]] = []
        self.sent: list[tuple[LifecycleEvent, bytes]] = []
        self.letters = DeadLetters(queue="ops.dead", total=0, letters=[])
        self.replay_result = Replay(queue="ops.dead", replayed=[], kept=[])
        self.count = 0
        self.closed = False
        self.answered_by: str | None = None

    def _call(self, name: str, argument: object) -> None:
        self.calls.append((name, argument))
        if self.error is not None:
            raise self.error

    async def command(
        self, body: dict[str, Any], *, timeout: float, expire: bool = True
    ) -> dict[str, Any]:
        self._call("command", body)
        self.commands.append((body, timeout, expire))
        return self.reply

    async def send(self, event: LifecycleEvent, body: bytes) -> None:
        self._call("send", body)
        self.sent.append((event, body))

    async def dead_letters(self, *, limit: int | None = None) -> DeadLetters:
        self._call("dead_letters", limit)
        return self.letters

    async def replay(self, count: int | None = None) -> Replay:
        self._call("replay", count)
        return self.replay_result

    async def dead_count(self) -> int:
        self._call("dead_count", None)
        return self.count

    async def purge(self) -> int:
        self._call("purge", None)
        return self.count

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def bus(monkeypatch: pytest.MonkeyPatch) -> FakeControl:
    """Replace `Control.connect` with one handing out a `FakeControl`."""
    fake = FakeControl()
    connections: list[tuple[str, str]] = []

    async def connect(url: str, namespace: str) -> FakeControl:
        connections.append((url, namespace))
        return fake

    monkeypatch.setattr(control.Control, "connect", connect)
    return fake


def letter(position: int, **fields: Any) -> DeadLetter:
    values: dict[str, Any] = {
        "position": position,
        "body": b"{bad",
        "content_type": "application/json",
        "reason": "invalid_json",
        "error": "body is not JSON",
        "exchange": "ops.lifecycle",
        "routing_key": "turn.settled",
        "death_reason": None,
    }
    values.update(fields)
    return DeadLetter(**values)


# -- intervals ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ms"),
    [("90s", 90_000), ("1500ms", 1500), ("2m", 120_000), ("1.5s", 1500), ("0s", 0)],
)
def test_an_interval_takes_ms_s_or_m(text: str, ms: int) -> None:
    assert parse_interval(text) == ms


def test_a_bare_number_is_refused_naming_the_units(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["interval", "demo", "90"]) == 2

    err = capsys.readouterr().err
    assert "'90' has no unit" in err
    assert "90s" in err and "units: ms, s, m" in err


@pytest.mark.parametrize("text", ["abc", "5h", "1e3s", "90 s", "s", "1.s"])
def test_an_interval_without_a_known_unit_is_refused(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["interval", "demo", text]) == 2

    assert "units: ms, s, m" in capsys.readouterr().err


def test_an_absurd_interval_is_refused() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="too long"):
        parse_interval("9999999999999999m")


def test_the_interval_is_sent_as_interval_ms(
    bus: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    bus.reply = {"ok": True, "settings": {"enabled": True, "intervalMs": 90_000}}

    assert main(["interval", "demo", "90s"]) == 0

    body, timeout, expire = bus.commands[0]
    assert body == {"type": "set_interval", "conversationId": "demo", "intervalMs": 90_000}
    assert (timeout, expire) == (10.0, True)
    assert capsys.readouterr().out == "demo: enabled, interval 90 s\n"


def test_a_clamped_interval_says_so(bus: FakeControl, capsys: pytest.CaptureFixture[str]) -> None:
    bus.reply = {"ok": True, "settings": {"enabled": False, "intervalMs": 1000}}

    assert main(["interval", "demo", "0s"]) == 0

    assert "interval 1 s (asked 0 s" in capsys.readouterr().out


# -- help ---------------------------------------------------------------------------


def test_top_level_help_lists_every_verb_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0

    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ")}
    assert listed == {"run", "watch", "demo", "simulate", *VERBS}
    assert "75" in out and "69" in out


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_has_help_with_an_example(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([verb, "--help"]) == 0

    out = capsys.readouterr().out
    assert f"usage: warmer {verb}" in out
    assert "examples:" in out
    assert f"  warmer {verb} " in out or f"| warmer {verb}" in out
    assert "exit codes:" in out and "75 no worker answered" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["state"],
        ["state", "demo", "--timeout", "0"],
        ["state", "demo", "--timeout", "soon"],
        ["interval", "demo"],
        ["policy", "demo"],
        ["policy", "demo", "cheap"],
        ["send"],
        ["dead", "--all"],
        ["dead", "--yes"],
        ["dead", "--replay", "0"],
        ["dead", "--replay", "2", "--all"],
        ["dead", "--replay", "--purge"],
        ["dead", "--limit", "-1"],
        ["reshard"],
        ["reshard", "--shards", "0"],
        ["reshard", "--shards", "257"],
        ["reshard", "--shards", "four"],
    ],
)
def test_usage_errors_exit_2_before_connecting(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2

    err = capsys.readouterr().err
    assert "usage: warmer" in err
    assert "RabbitMQ" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["state", "\udcff"],
        ["enable", "conv-\udcff"],
        ["disable", "\udcffx"],
        ["interval", "caf\udcc3", "90s"],
        ["policy", "\udc80", "fixed"],
    ],
)
def test_a_conversation_id_that_is_not_utf8_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # A byte that is not UTF-8 reaches sys.argv surrogate-escaped ($'\xff' in a shell).
    assert main(argv) == 2

    err = capsys.readouterr().err
    assert f"usage: warmer {argv[0]}" in err
    assert "argument CONV: b'" in err
    assert "is not UTF-8: a conversation id is UTF-8 text" in err
    assert "Traceback" not in err and "RabbitMQ" not in err


def test_a_conversation_id_in_utf8_beyond_ascii_is_sent_as_it_is(bus: FakeControl) -> None:
    assert main(["state", "café-日本"]) == 0

    assert bus.commands[0][0] == {"type": "get_state", "conversationId": "café-日本"}


def test_a_bad_setting_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WARMER_NAMESPACE", "not a namespace")

    assert main(["state", "demo"]) == 2

    assert capsys.readouterr().err.startswith("warmer: WARMER_NAMESPACE='not a namespace'")


# -- commands -----------------------------------------------------------------------


def test_state_is_a_short_block(bus: FakeControl, capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time_ns() // 1_000_000
    bus.reply = {
        "ok": True,
        "state": {
            "enabled": True,
            "intervalMs": 90_000,
            "status": "armed",
            "lastPct": 97,
            "lastExpectedPct": 95,
            "nextWarmAt": now + 83_500,
            "lastError": None,
            "failures": 0,
        },
        "spec": {},
    }

    assert main(["state", "demo"]) == 0

    assert capsys.readouterr().out.splitlines() == [
        "conversation: demo",
        "enabled:      yes",
        "status:       armed",
        "interval:     90 s",
        "next warm in: 1 min 24 s",
        "last cache:   97%",
        "retention:    95%",
        "failures:     0",
        "last error:   —",
    ]
    body, _, expire = bus.commands[0]
    assert body == {"type": "get_state", "conversationId": "demo"}
    assert expire is False  # a read has nothing to apply late
    assert bus.closed


def test_json_prints_the_reply_on_one_line(
    bus: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["enable", "demo", "--json", "--timeout", "2.5"]) == 0

    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert json.loads(out) == bus.reply
    body, timeout, _ = bus.commands[0]
    assert body == {"type": "set_enabled", "conversationId": "demo", "enabled": True}
    assert timeout == 2.5


def test_disable_sends_enabled_false(bus: FakeControl) -> None:
    assert main(["disable", "demo"]) == 0

    body, _, _ = bus.commands[0]
    assert body == {"type": "set_enabled", "conversationId": "demo", "enabled": False}


def test_a_rejection_exits_1_showing_code_and_error(
    bus: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    bus.reply = {"ok": False, "code": "invalid_field", "error": "conversationId: too long"}

    assert main(["enable", "x" * 300]) == 1

    captured = capsys.readouterr()
    assert captured.out == ""
    assert "invalid_field: conversationId: too long" in captured.err


def test_a_rejection_with_json_prints_the_reply(
    bus: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    bus.reply = {"ok": False, "code": "store_error", "error": "disk full"}

    assert main(["enable", "demo", "--json"]) == 1

    assert json.loads(capsys.readouterr().out) == bus.reply


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (control.NoAnswer("no worker answered within 10 s"), 75),
        (control.NotDelivered("the broker refused the command"), 75),
        (control.BrokerUnreachable("cannot reach RabbitMQ"), 69),
        (control.NamespaceMissing("exchange 'ops.commands' does not exist"), 69),
        (control.ControlError("the broker refused: access refused"), 69),
    ],
)
def test_bus_failures_have_their_exit_codes(
    bus: FakeControl, capsys: pytest.CaptureFixture[str], error: Exception, code: int
) -> None:
    bus.error = error

    assert main(["state", "demo"]) == code

    assert capsys.readouterr().err == f"warmer: {error}\n"
    assert bus.closed


def test_no_broker_exits_69_naming_the_url_without_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["state", "demo"]) == 69

    err = capsys.readouterr().err
    assert err.startswith("warmer: cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/")
    assert "s3cr3t" not in err
    assert err.count("\n") == 1


# -- send ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "shown"),
    [
        ("{bad", "invalid_json: body is not JSON"),
        ('{"type": "turn.settled"}', "invalid_field: turn.settled: Object missing required"),
        ('{"type": "turn.settled", "conversationId": ""}', "invalid_field"),
        ('{"type": "turn.done", "conversationId": "demo"}', "unknown type 'turn.done'"),
        ("[]", "invalid_json"),
    ],
)
def test_an_invalid_event_is_refused_locally(
    event: str, shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["send", event]) == 2

    err = capsys.readouterr().err
    assert err.startswith("warmer: not a valid event: ")
    assert shown in err


def test_a_valid_event_is_sent_as_given(
    bus: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    text = '{"type": "turn.settled", "conversationId": "demo", "cwd": "/srv", "extra": 1}'

    assert main(["send", text]) == 0

    event, body = bus.sent[0]
    assert body == text.encode()
    assert event.conversation_id == "demo"
    assert capsys.readouterr().out == "sent turn.settled for demo\n"


def test_send_reads_stdin_for_a_dash(
    bus: FakeControl, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO('{"type":"turn.started","conversationId":"a"}'))

    assert main(["send", "-", "--json"]) == 0

    assert json.loads(capsys.readouterr().out) == {
        "ok": True,
        "type": "turn.started",
        "conversationId": "a",
    }


# -- dead letters -------------------------------------------------------------------


def test_dead_lists_reason_error_origin_and_a_short_body(
    bus: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    bus.letters = DeadLetters(
        queue="ops.dead",
        total=3,
        letters=[
            letter(1),
            letter(
                2,
                body=b"x" * 1000,
                reason=None,
                error=None,
                exchange="ops.commands",
                routing_key="command",
                death_reason="delivery_limit",
            ),
        ],
    )

    assert main(["dead", "--limit", "2"]) == 0

    out = capsys.readouterr().out.splitlines()
    assert out[0] == "3 dead letters in ops.dead, the oldest 2 shown"
    assert out[1] == "#1  invalid_json  from ops.lifecycle / turn.settled"
    assert out[2] == "    error: body is not JSON"
    assert out[3] == "    body:  {bad"
    assert out[4] == "#2  x-death delivery_limit  from ops.commands / command"
    assert out[5] == "    body:  " + "x" * 120 + "… (1000 bytes)"
    assert bus.calls == [("dead_letters", 2)]


def test_dead_json_is_one_line(bus: FakeControl, capsys: pytest.CaptureFixture[str]) -> None:
    bus.letters = DeadLetters(queue="ops.dead", total=1, letters=[letter(1, body=b"\x00{")])

    assert main(["dead", "--json"]) == 0

    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert json.loads(out) == {
        "queue": "ops.dead",
        "total": 1,
        "deadLetters": [
            {
                "position": 1,
                "reason": "invalid_json",
                "error": "body is not JSON",
                "exchange": "ops.lifecycle",
                "routingKey": "turn.settled",
                "deathReason": None,
                "contentType": "application/json",
                "body": "\\x00{",
                "bodyBytes": 2,
            }
        ],
    }


def test_no_dead_letters(bus: FakeControl, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dead"]) == 0

    assert capsys.readouterr().out == "no dead letters in ops.dead\n"


@pytest.mark.parametrize(
    ("argv", "count"),
    [(["--replay"], 1), (["--replay", "3"], 3), (["--replay", "--all"], None)],
)
def test_replay_takes_n_or_all(argv: list[str], count: int | None, bus: FakeControl) -> None:
    assert main(["dead", *argv]) == 0

    assert bus.calls == [("replay", count)]


def test_a_replay_that_keeps_some_exits_1(
    bus: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    bus.replay_result = Replay(
        queue="ops.dead",
        replayed=[letter(1)],
        kept=[Kept(letter=letter(2, exchange=None, routing_key=None), why="nowhere to go")],
    )

    assert main(["dead", "--replay", "2"]) == 1

    assert capsys.readouterr().out.splitlines() == [
        "replayed 1, kept 1 in ops.dead",
        "#1  replayed to ops.lifecycle / turn.settled",
        "#2  kept: nowhere to go",
    ]


def test_purge_off_a_terminal_needs_yes(
    bus: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dead", "--purge"]) == 2

    assert "--yes" in capsys.readouterr().err
    assert bus.calls == []


def test_purge_with_yes_asks_nothing(bus: FakeControl, capsys: pytest.CaptureFixture[str]) -> None:
    bus.count = 4

    assert main(["dead", "--purge", "--yes"]) == 0

    assert bus.calls == [("purge", None)]
    assert capsys.readouterr().out == "deleted 4 from ops.dead\n"


class Terminal(io.StringIO):
    """Standard input that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "code", "purged"), [("purge\n", 0, True), ("y\n", 1, False)])
def test_purge_on_a_terminal_asks_for_the_word(
    answer: str,
    code: int,
    purged: bool,
    bus: FakeControl,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("sys.stdin", Terminal(answer))
    bus.count = 3

    assert main(["dead", "--purge"]) == code

    assert "type 'purge' to delete 3 dead letters" in capsys.readouterr().err
    assert (("purge", None) in bus.calls) is purged


# -- the cost policy ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "sent", "shown"),
    [
        ("adaptive", "adaptive", "demo: enabled, interval 240 s, cost policy adaptive\n"),
        ("budget", "budget", "demo: enabled, interval 240 s, cost policy budget\n"),
        ("fixed", "fixed", "demo: enabled, interval 240 s, cost policy fixed\n"),
        ("default", None, "demo: enabled, interval 240 s, the deployment's cost policy\n"),
    ],
)
def test_policy_sends_set_policy_and_default_sends_null(
    word: str, sent: str | None, shown: str, bus: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    settings: dict[str, Any] = {"enabled": True, "intervalMs": 240_000}
    bus.reply = {"ok": True, "settings": settings if sent is None else {**settings, "policy": sent}}

    assert main(["policy", "demo", word]) == 0

    body, _, expire = bus.commands[0]
    assert body == {"type": "set_policy", "conversationId": "demo", "policy": sent}
    assert expire is True
    assert capsys.readouterr().out == shown


def test_a_refused_policy_exits_1(bus: FakeControl, capsys: pytest.CaptureFixture[str]) -> None:
    bus.reply = {"ok": False, "code": "invalid_field", "error": "set_policy: policy: ..."}

    assert main(["policy", "demo", "adaptive", "--json"]) == 1

    assert json.loads(capsys.readouterr().out) == bus.reply


def test_state_shows_the_cost_fields_of_the_panel_after_its_own(
    bus: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    savings = "net +48.9k tokens: warms 15.4k, re-writes avoided 64.4k, not avoided 0"
    bus.reply = {
        "ok": True,
        "state": {"enabled": True, "intervalMs": 240_000, "status": "expired", "failures": 0},
        "spec": {
            "fields": [
                {"kind": "toggle", "label": "Enabled", "value": True},
                {"kind": "stat", "label": "Last Cache %", "value": "99%"},
                {"kind": "stat", "label": "Status", "value": "expired"},
                {"kind": "stat", "label": "Cost policy", "value": "adaptive"},
                {"kind": "stat", "label": "Cache lifetime", "value": "5 min"},
                {"kind": "stat", "label": "Effective interval", "value": "4 min"},
                {"kind": "stat", "label": "Not warming", "value": "the cache expired"},
                {"kind": "stat", "label": "Savings", "value": savings},
                {"kind": "stat", "label": "Odd", "value": 7},
                "not a field",
            ]
        },
    }

    assert main(["state", "demo"]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "conversation:       demo"
    assert lines[2] == "status:             expired"
    assert lines[9:] == [
        "cost policy:        adaptive",
        "cache lifetime:     5 min",
        "effective interval: 4 min",
        "not warming:        the cache expired",
        f"savings:            {savings}",
    ]


# -- reshard ---------------------------------------------------------------------------


class FakeShared:
    """A store that opens and closes; the reshard itself is faked."""

    def __init__(self) -> None:
        self.opened = self.closed = False

    async def open(self) -> None:
        self.opened = True

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def resharded(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """`warmer reshard` with a fake store and a fake reshard: what it was given."""
    import warmer.reshard
    import warmer.store

    given: dict[str, Any] = {"shared": FakeShared(), "outcome": None}

    async def fake_reshard(url: str, ns: str, shards: int, shared: object, **kw: Any) -> object:
        given.update(url=url, namespace=ns, shards=shards)
        kw["say"]("moving ops.lifecycle: 3 moved, 0 dead-lettered")
        if isinstance(given["outcome"], Exception):
            raise given["outcome"]
        return warmer.reshard.Summary(
            namespace=ns,
            shards=shards,
            previous=1,
            moved={"ops.lifecycle": 3, "ops.commands": 1},
            dead=1,
            deleted=["ops.lifecycle", "ops.commands"],
            records=[2, 0, 1, 1],
            reassigned=3,
            seconds=1.5,
        )

    monkeypatch.setattr(warmer.reshard, "reshard", fake_reshard)
    monkeypatch.setattr(warmer.store, "open_shared", lambda url, **kw: given["shared"], False)
    yield given


def test_reshard_prints_a_summary_and_progress(
    resharded: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["reshard", "--shards", "4"]) == 0

    captured = capsys.readouterr()
    assert resharded["shards"] == 4 and resharded["namespace"] == "ops"
    assert resharded["shared"].opened and resharded["shared"].closed
    assert captured.err.splitlines() == [
        "reshard: moving ops.lifecycle: 3 moved, 0 dead-lettered",
        "reshard: WARMER_SHARDS is 1 here: give the workers 4",
    ]
    assert "4 shards (the store's layout was 1 shard)" in captured.out
    assert "messages moved: 4, dead-lettered (no readable id): 1" in captured.out
    assert "per shard: 0: 2, 1: 0, 2: 1, 3: 1" in captured.out
    assert captured.out.rstrip().endswith("WARMER_SHARDS=4")


def test_reshard_json_is_the_summary(
    resharded: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WARMER_SHARDS", "4")
    assert main(["reshard", "--shards", "4", "--json"]) == 0

    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["records"] == [2, 0, 1, 1] and summary["dead"] == 1
    assert "WARMER_SHARDS" not in captured.err, "the settings already say 4"


def test_reshard_refused_while_a_worker_consumes_exits_1(
    resharded: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from warmer.bus.reshard import PluginMissing, Refused

    resharded["outcome"] = Refused(
        "a worker of namespace 'ops' runs (consumers on ops.commands (1))"
    )
    assert main(["reshard", "--shards", "4"]) == 1
    assert "ops.commands (1)" in capsys.readouterr().err

    resharded["outcome"] = PluginMissing("unknown exchange type")
    assert main(["reshard", "--shards", "4"]) == 69
    assert "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange" in capsys.readouterr().err
    assert resharded["shared"].closed


def test_state_says_which_replica_answered(
    bus: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    bus.reply = {"ok": True, "state": {"enabled": True, "status": "armed"}}
    bus.answered_by = "warmer-2"
    assert main(["state", "c-1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "answered by:  replica warmer-2"
