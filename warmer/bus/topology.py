"""The topology of docs/contract.md: names under a namespace, declared idempotently at start.

With one shard (``WARMER_SHARDS=1``) the inbound queues are bound straight to the
exchanges publishers use. With S > 1 each of those exchanges forwards (an
exchange-to-exchange binding) to a ``.shards`` exchange of type ``x-consistent-hash``
that hashes the ``conversation-id`` header onto S shard queues, so a conversation's
traffic stays on one queue and its owner alone consumes it; publishers change nothing.

RabbitMQ 3.10 keeps the hash ring in memory and rebuilds it at boot from the bindings
sorted by queue name: the shard queues are zero-padded and bound in shard order, so that
the ring built at declare time (bucket i = the i-th binding made) is the ring rebuilt
after a broker restart, and every conversation stays on its shard.

``definitions`` renders the same topology as a RabbitMQ definitions file, so an
operator can load it (``deploy/definitions.json``) and a test can check the two agree.
"""

from __future__ import annotations

from typing import Any, Final

import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, ExchangeType
from msgspec import Struct

from warmer.bus.port import PluginMissing

DELIVERY_LIMIT: Final = 20
COMMAND_ROUTING_KEY: Final = "command"
WARM_ROUTING_KEY: Final = "warm.requested"
SURFACE_ROUTING_KEY: Final = "surface.changed"
SHARD_HEADER: Final = "conversation-id"
"""The header the ``.shards`` exchanges hash (docs/contract.md asks publishers to set it)."""
MAX_SHARDS: Final = 256
SHARD_WEIGHT: Final = "1"
"""Every shard queue is bound with the same weight: one bucket of the ring each."""
HASH_PLUGIN: Final = "rabbitmq_consistent_hash_exchange"


class Names(Struct, frozen=True, kw_only=True):
    """Every exchange and queue name, prefixed by the namespace, for ``shards`` shards."""

    namespace: str
    lifecycle: str
    commands: str
    warm: str
    surface: str
    dlx: str
    dead: str
    shards: int = 1

    @classmethod
    def of(cls, namespace: str, shards: int = 1) -> Names:
        """The names of a deployment whose namespace is ``namespace``."""
        if not 1 <= shards <= MAX_SHARDS:
            raise ValueError(f"shards must be 1 to {MAX_SHARDS}, got {shards}")
        return cls(
            namespace=namespace,
            lifecycle=f"{namespace}.lifecycle",
            commands=f"{namespace}.commands",
            warm=f"{namespace}.warm",
            surface=f"{namespace}.surface",
            dlx=f"{namespace}.dlx",
            dead=f"{namespace}.dead",
            shards=shards,
        )

    @property
    def sharded(self) -> bool:
        """True when the broker hashes inbound traffic onto several shard queues."""
        return self.shards > 1

    @property
    def lifecycle_shards(self) -> str:
        """The consistent-hash exchange of lifecycle events (S > 1)."""
        return f"{self.lifecycle}.shards"

    @property
    def commands_shards(self) -> str:
        """The consistent-hash exchange of commands (S > 1)."""
        return f"{self.commands}.shards"

    def shard_queues(self, shard: int) -> tuple[str, str]:
        """The lifecycle and command queues of shard ``shard`` (0 to S - 1)."""
        if not 0 <= shard < self.shards:
            raise ValueError(f"shard must be 0 to {self.shards - 1}, got {shard}")
        if not self.sharded:
            return self.lifecycle, self.commands
        # Zero-padded: sorted names are shard order (see the module's docstring).
        return f"{self.lifecycle}.shard.{shard:03d}", f"{self.commands}.shard.{shard:03d}"

    def lock(self, shard: int) -> str:
        """The exclusive queue whose declaring connection owns shard ``shard``
        (``warmer.bus.lock``); made by the owner, not part of the declared topology."""
        self.shard_queues(shard)  # the same range check
        return f"{self.namespace}.lock.{shard:03d}"

    def exchanges(self) -> list[tuple[str, ExchangeType]]:
        """Every exchange with its type."""
        exchanges = [
            (self.lifecycle, ExchangeType.TOPIC),
            (self.commands, ExchangeType.DIRECT),
            (self.warm, ExchangeType.TOPIC),
            (self.surface, ExchangeType.TOPIC),
            (self.dlx, ExchangeType.FANOUT),
        ]
        if self.sharded:
            exchanges += [
                (self.lifecycle_shards, ExchangeType.X_CONSISTENT_HASH),
                (self.commands_shards, ExchangeType.X_CONSISTENT_HASH),
            ]
        return exchanges

    def exchange_arguments(self, name: str) -> dict[str, Any]:
        """The arguments of exchange ``name``: the hashed header for a ``.shards`` one."""
        if self.sharded and name in (self.lifecycle_shards, self.commands_shards):
            return {"hash-header": SHARD_HEADER}
        return {}

    def queues(self) -> list[tuple[str, dict[str, Any]]]:
        """Every queue with its exact arguments, the shard queues in shard order."""
        inbound = inbound_queue_arguments(self.dlx)
        shards = [self.shard_queues(shard) for shard in range(self.shards)]
        return [
            *((lifecycle, dict(inbound)) for lifecycle, _ in shards),
            *((commands, dict(inbound)) for _, commands in shards),
            (self.dead, {"x-queue-type": "quorum"}),
        ]

    def exchange_bindings(self) -> list[tuple[str, str, str]]:
        """Every exchange-to-exchange binding as (source, destination, routing key)."""
        if not self.sharded:
            return []
        return [
            (self.lifecycle, self.lifecycle_shards, "#"),
            (self.commands, self.commands_shards, COMMAND_ROUTING_KEY),
        ]

    def bindings(self) -> list[tuple[str, str, str]]:
        """Every queue binding as (exchange, queue, routing key), shards in shard order."""
        if not self.sharded:
            inbound = [
                (self.lifecycle, self.lifecycle, "#"),
                (self.commands, self.commands, COMMAND_ROUTING_KEY),
            ]
        else:
            shards = [self.shard_queues(shard) for shard in range(self.shards)]
            inbound = [
                *((self.lifecycle_shards, lifecycle, SHARD_WEIGHT) for lifecycle, _ in shards),
                *((self.commands_shards, commands, SHARD_WEIGHT) for _, commands in shards),
            ]
        return [*inbound, (self.dlx, self.dead, "")]


def inbound_queue_arguments(dlx: str) -> dict[str, Any]:
    """The arguments of the inbound quorum queues (docs/contract.md, "Queues")."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": dlx,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": DELIVERY_LIMIT,
    }


class Topology(Struct, frozen=True, kw_only=True):
    """The declared exchanges and queues the worker uses."""

    names: Names
    exchanges: dict[str, AbstractExchange]
    queues: dict[str, AbstractQueue]


async def declare_exchange(
    channel: AbstractChannel,
    name: str,
    kind: ExchangeType | str,
    arguments: dict[str, Any] | None = None,
) -> AbstractExchange:
    """Declare one durable exchange; PluginMissing when the broker does not know its type.

    The broker answers an unknown exchange type with connection.close 503 COMMAND_INVALID
    (the whole connection, not the channel); the exception says which plugin to enable.
    """
    try:
        return await channel.declare_exchange(name, kind, durable=True, arguments=arguments)
    except aiormq.exceptions.ConnectionCommandInvalid as exc:
        if "unknown exchange type" not in str(exc):
            raise
        shown = kind.value if isinstance(kind, ExchangeType) else kind
        raise PluginMissing(
            f"the broker does not know the exchange type {shown!r} that WARMER_SHARDS > 1 "
            f"needs: enable the {HASH_PLUGIN} plugin on every broker node "
            f"(`rabbitmq-plugins enable {HASH_PLUGIN}`)"
        ) from exc


async def declare(channel: AbstractChannel, names: Names) -> Topology:
    """Declare the whole topology; safe to repeat (same arguments).

    Bindings are made in list order, shard 000 first: the order the hash ring needs.
    PluginMissing when S > 1 and the broker lacks the consistent-hash plugin (the broker
    has then closed the channel's connection).
    """
    exchanges: dict[str, AbstractExchange] = {}
    for name, kind in names.exchanges():
        arguments = names.exchange_arguments(name) or None
        exchanges[name] = await declare_exchange(channel, name, kind, arguments)
    queues: dict[str, AbstractQueue] = {}
    for name, arguments in names.queues():
        queues[name] = await channel.declare_queue(name, durable=True, arguments=arguments)
    for source, destination, routing_key in names.exchange_bindings():
        await exchanges[destination].bind(exchanges[source], routing_key)
    for exchange, queue, routing_key in names.bindings():
        await queues[queue].bind(exchanges[exchange], routing_key)
    return Topology(names=names, exchanges=exchanges, queues=queues)


async def delete(channel: AbstractChannel, names: Names) -> None:
    """Delete every exchange and queue of a namespace with ``names.shards`` shards (tests
    and ``teardown``); deleting an exchange removes its bindings."""
    for name, _ in names.queues():
        await channel.queue_delete(name)
    for name, _ in names.exchanges():
        await channel.exchange_delete(name)


def definitions(namespace: str, shards: int = 1, vhost: str = "/") -> dict[str, Any]:
    """The topology as a RabbitMQ definitions document (bindings in shard order)."""
    names = Names.of(namespace, shards)
    exchange_bindings = [
        (source, destination, "exchange", key)
        for source, destination, key in names.exchange_bindings()
    ]
    queue_bindings = [(exchange, queue, "queue", key) for exchange, queue, key in names.bindings()]
    return {
        "exchanges": [
            {
                "name": name,
                "vhost": vhost,
                "type": kind.value,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": names.exchange_arguments(name),
            }
            for name, kind in names.exchanges()
        ],
        "queues": [
            {
                "name": name,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                "arguments": arguments,
            }
            for name, arguments in names.queues()
        ],
        "bindings": [
            {
                "source": source,
                "vhost": vhost,
                "destination": destination,
                "destination_type": destination_type,
                "routing_key": routing_key,
                "arguments": {},
            }
            for source, destination, destination_type, routing_key in (
                exchange_bindings + queue_bindings
            )
        ],
    }


__all__ = [
    "HASH_PLUGIN",
    "MAX_SHARDS",
    "SHARD_HEADER",
    "Names",
    "Topology",
    "declare",
    "declare_exchange",
    "definitions",
    "delete",
    "inbound_queue_arguments",
]
