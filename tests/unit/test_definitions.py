"""deploy/definitions.json: the topology of docs/contract.md, and the same as the code renders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from warmer.bus.topology import Names, definitions

DEFINITIONS_FILE = Path(__file__).parents[2] / "deploy" / "definitions.json"

# docs/contract.md, "Queues": the two inbound queues share these arguments.
INBOUND_ARGUMENTS = {
    "x-queue-type": "quorum",
    "x-dead-letter-exchange": "warmer.dlx",
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
    "x-delivery-limit": 20,
}
QUEUES = {
    "warmer.lifecycle": INBOUND_ARGUMENTS,
    "warmer.commands": INBOUND_ARGUMENTS,
    "warmer.dead": {"x-queue-type": "quorum"},
}
EXCHANGES = {
    "warmer.lifecycle": "topic",
    "warmer.commands": "direct",
    "warmer.warm": "topic",
    "warmer.surface": "topic",
    "warmer.dlx": "fanout",
}
BINDINGS = {
    ("warmer.lifecycle", "warmer.lifecycle", "#"),
    ("warmer.commands", "warmer.commands", "command"),
    ("warmer.dlx", "warmer.dead", ""),
}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return json.loads(DEFINITIONS_FILE.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def test_the_file_is_what_the_code_renders(document: dict[str, Any]) -> None:
    assert document == definitions("warmer")


def test_the_file_is_formatted_as_the_regeneration_one_liner_prints_it() -> None:
    expected = json.dumps(definitions("warmer"), indent=2) + "\n"
    assert DEFINITIONS_FILE.read_text(encoding="utf-8") == expected


def test_only_exchanges_queues_and_bindings(document: dict[str, Any]) -> None:
    assert set(document) == {"exchanges", "queues", "bindings"}


def test_every_exchange_of_the_contract_with_its_type(document: dict[str, Any]) -> None:
    exchanges = {e["name"]: e for e in document["exchanges"]}
    assert {name: e["type"] for name, e in exchanges.items()} == EXCHANGES
    assert len(document["exchanges"]) == len(EXCHANGES)
    for exchange in exchanges.values():
        assert exchange["vhost"] == "/"
        assert exchange["durable"] is True
        assert exchange["auto_delete"] is False
        assert exchange["internal"] is False
        assert exchange["arguments"] == {}


def test_every_queue_of_the_contract_with_its_exact_arguments(document: dict[str, Any]) -> None:
    queues = {q["name"]: q for q in document["queues"]}
    assert {name: q["arguments"] for name, q in queues.items()} == QUEUES
    assert len(document["queues"]) == len(QUEUES)
    for queue in queues.values():
        assert queue["vhost"] == "/"
        assert queue["durable"] is True
        assert queue["auto_delete"] is False


def test_the_delivery_limit_is_an_integer(document: dict[str, Any]) -> None:
    # A string "20" would be a different argument to RabbitMQ (and fail the worker's declare).
    for queue in document["queues"]:
        limit = queue["arguments"].get("x-delivery-limit")
        assert limit is None or type(limit) is int


def test_every_binding_of_the_contract(document: dict[str, Any]) -> None:
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in document["bindings"]}
    assert bindings == BINDINGS
    assert len(document["bindings"]) == len(BINDINGS)
    for binding in document["bindings"]:
        assert binding["vhost"] == "/"
        assert binding["destination_type"] == "queue"
        assert binding["arguments"] == {}


def test_a_binding_joins_only_declared_names(document: dict[str, Any]) -> None:
    exchanges = {e["name"] for e in document["exchanges"]}
    queues = {q["name"] for q in document["queues"]}
    for binding in document["bindings"]:
        assert binding["source"] in exchanges
        assert binding["destination"] in queues


def test_another_namespace_renames_everything_the_same_way() -> None:
    rendered = json.dumps(definitions("myns"))
    assert "warmer" not in rendered
    assert json.loads(rendered.replace("myns.", "warmer.")) == definitions("warmer")


def test_another_vhost() -> None:
    document = definitions("warmer", vhost="prod")
    for section in ("exchanges", "queues", "bindings"):
        assert {item["vhost"] for item in document[section]} == {"prod"}


# -- S > 1: the sharded topology (deploy/definitions-16-shards.json) -----------------------

SHARDED_FILE = Path(__file__).parents[2] / "deploy" / "definitions-16-shards.json"
SHARDS = 16


def test_the_sharded_example_is_what_the_code_renders() -> None:
    expected = json.dumps(definitions("warmer", SHARDS), indent=2) + "\n"
    assert SHARDED_FILE.read_text(encoding="utf-8") == expected


def test_one_shard_is_the_unsharded_topology() -> None:
    assert definitions("warmer", 1) == definitions("warmer")
    assert Names.of("warmer", 1).shard_queues(0) == ("warmer.lifecycle", "warmer.commands")


def test_sharded_exchanges_hash_the_conversation_id_header() -> None:
    exchanges = {e["name"]: e for e in definitions("warmer", 4)["exchanges"]}
    assert {name: e["type"] for name, e in exchanges.items()} == {
        **EXCHANGES,
        "warmer.lifecycle.shards": "x-consistent-hash",
        "warmer.commands.shards": "x-consistent-hash",
    }
    for name in ("warmer.lifecycle.shards", "warmer.commands.shards"):
        assert exchanges[name]["arguments"] == {"hash-header": "conversation-id"}
    for name in EXCHANGES:
        assert exchanges[name]["arguments"] == {}


def test_sharded_queues_are_zero_padded_inbound_queues_and_no_unsharded_one() -> None:
    queues = {q["name"]: q["arguments"] for q in definitions("warmer", 4)["queues"]}
    expected = {
        **{f"warmer.lifecycle.shard.{k:03d}": INBOUND_ARGUMENTS for k in range(4)},
        **{f"warmer.commands.shard.{k:03d}": INBOUND_ARGUMENTS for k in range(4)},
        "warmer.dead": {"x-queue-type": "quorum"},
    }
    assert queues == expected


def test_sharded_bindings_forward_from_the_publishers_exchanges_in_shard_order() -> None:
    bindings = [
        (b["source"], b["destination"], b["destination_type"], b["routing_key"])
        for b in definitions("warmer", 12)["bindings"]
    ]
    assert bindings[:2] == [
        ("warmer.lifecycle", "warmer.lifecycle.shards", "exchange", "#"),
        ("warmer.commands", "warmer.commands.shards", "exchange", "command"),
    ]
    for stream in ("lifecycle", "commands"):
        shards = [b for b in bindings if b[0] == f"warmer.{stream}.shards"]
        # Creation order is sorted order: what RabbitMQ 3.10 rebuilds the ring from at boot.
        assert [b[1] for b in shards] == [f"warmer.{stream}.shard.{k:03d}" for k in range(12)]
        assert [b[1] for b in shards] == sorted(b[1] for b in shards)
        assert {(b[2], b[3]) for b in shards} == {("queue", "1")}
    assert bindings[-1] == ("warmer.dlx", "warmer.dead", "queue", "")


def test_shard_queues_name_both_streams_of_a_shard() -> None:
    names = Names.of("ns", 256)
    assert names.shard_queues(0) == ("ns.lifecycle.shard.000", "ns.commands.shard.000")
    assert names.shard_queues(255) == ("ns.lifecycle.shard.255", "ns.commands.shard.255")
    for shard in (-1, 256):
        with pytest.raises(ValueError, match="shard must be"):
            names.shard_queues(shard)


@pytest.mark.parametrize("shards", [0, 257])
def test_shards_are_1_to_256(shards: int) -> None:
    with pytest.raises(ValueError, match="1 to 256"):
        Names.of("ns", shards)


def test_shard_locks_are_named_per_shard_and_not_declared() -> None:
    names = Names.of("ns", 16)
    assert names.lock(0) == "ns.lock.000" and names.lock(15) == "ns.lock.015"
    assert Names.of("ns").lock(0) == "ns.lock.000"
    with pytest.raises(ValueError, match="shard must be"):
        names.lock(16)
    assert "ns.lock" not in json.dumps(definitions("ns", 16))


def test_reshard_names_the_queues_and_exchanges_the_worker_consumes() -> None:
    # warmer reshard builds its names itself (it must also name a layout no worker runs):
    # they must be the worker's, or a reshard would fill queues nobody consumes.
    from warmer.bus.reshard import shards_exchange_arguments, streams

    for shards in (2, 4, 16, 256):
        names = Names.of("ns", shards)
        lifecycle, commands = streams("ns")
        assert lifecycle.exchange == names.lifecycle and commands.exchange == names.commands
        assert lifecycle.shards_exchange == names.lifecycle_shards
        assert commands.shards_exchange == names.commands_shards
        for shard in (0, 1, shards - 1):
            assert (lifecycle.shard_queue(shard), commands.shard_queue(shard)) == (
                names.shard_queues(shard)
            )
        assert shards_exchange_arguments() == names.exchange_arguments(names.lifecycle_shards)
