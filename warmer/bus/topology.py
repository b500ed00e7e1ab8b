"""The topology of docs/contract.md: names under a namespace, declared idempotently at start.

``definitions`` renders the same topology as a RabbitMQ definitions file, so an
operator can load it (``deploy/definitions.json``) and a test can check the two agree.
"""

from __future__ import annotations

from typing import Any, Final

from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, ExchangeType
from msgspec import Struct

DELIVERY_LIMIT: Final = 20
COMMAND_ROUTING_KEY: Final = "command"
WARM_ROUTING_KEY: Final = "warm.requested"
SURFACE_ROUTING_KEY: Final = "surface.changed"


class Names(Struct, frozen=True, kw_only=True):
    """Every exchange and queue name, prefixed by the namespace."""

    lifecycle: str
    commands: str
    warm: str
    surface: str
    dlx: str
    dead: str

    @classmethod
    def of(cls, namespace: str) -> Names:
        """The names of a deployment whose namespace is ``namespace``."""
        return cls(
            lifecycle=f"{namespace}.lifecycle",
            commands=f"{namespace}.commands",
            warm=f"{namespace}.warm",
            surface=f"{namespace}.surface",
            dlx=f"{namespace}.dlx",
            dead=f"{namespace}.dead",
        )

    def exchanges(self) -> list[tuple[str, ExchangeType]]:
        """Every exchange with its type."""
        return [
            (self.lifecycle, ExchangeType.TOPIC),
            (self.commands, ExchangeType.DIRECT),
            (self.warm, ExchangeType.TOPIC),
            (self.surface, ExchangeType.TOPIC),
            (self.dlx, ExchangeType.FANOUT),
        ]

    def queues(self) -> list[tuple[str, dict[str, Any]]]:
        """Every queue with its exact arguments."""
        inbound = inbound_queue_arguments(self.dlx)
        return [
            (self.lifecycle, inbound),
            (self.commands, dict(inbound)),
            (self.dead, {"x-queue-type": "quorum"}),
        ]

    def bindings(self) -> list[tuple[str, str, str]]:
        """Every binding as (exchange, queue, routing key)."""
        return [
            (self.lifecycle, self.lifecycle, "#"),
            (self.commands, self.commands, COMMAND_ROUTING_KEY),
            (self.dlx, self.dead, ""),
        ]


def inbound_queue_arguments(dlx: str) -> dict[str, Any]:
    """The arguments of the two inbound quorum queues (docs/contract.md, "Queues")."""
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


async def declare(channel: AbstractChannel, names: Names) -> Topology:
    """Declare the whole topology; safe to repeat (same arguments)."""
    exchanges: dict[str, AbstractExchange] = {}
    for name, kind in names.exchanges():
        exchanges[name] = await channel.declare_exchange(name, kind, durable=True)
    queues: dict[str, AbstractQueue] = {}
    for name, arguments in names.queues():
        queues[name] = await channel.declare_queue(name, durable=True, arguments=arguments)
    for exchange, queue, routing_key in names.bindings():
        await queues[queue].bind(exchanges[exchange], routing_key)
    return Topology(names=names, exchanges=exchanges, queues=queues)


async def delete(channel: AbstractChannel, names: Names) -> None:
    """Delete every exchange and queue of a namespace (tests and ``teardown``)."""
    for name, _ in names.queues():
        await channel.queue_delete(name)
    for name, _ in names.exchanges():
        await channel.exchange_delete(name)


def definitions(namespace: str, vhost: str = "/") -> dict[str, Any]:
    """The topology as a RabbitMQ definitions document."""
    names = Names.of(namespace)
    return {
        "exchanges": [
            {
                "name": name,
                "vhost": vhost,
                "type": kind.value,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
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
                "source": exchange,
                "vhost": vhost,
                "destination": queue,
                "destination_type": "queue",
                "routing_key": routing_key,
                "arguments": {},
            }
            for exchange, queue, routing_key in names.bindings()
        ],
    }


__all__ = [
    "Names",
    "Topology",
    "declare",
    "definitions",
    "delete",
    "inbound_queue_arguments",
]
