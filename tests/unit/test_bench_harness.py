"""The benchmarks' frame templates and /metrics arithmetic, without a broker."""

from __future__ import annotations

import pamqp.body
import pamqp.commands
import pamqp.frame
import pamqp.header

from bench._harness import by_label, total
from bench.orchestrator import Frames, completion


def _marshalled(channel: int, exchange: str, key: str, cid: str, body: bytes) -> bytes:
    properties = pamqp.commands.Basic.Properties(
        content_type="application/json", delivery_mode=2, headers={"conversation-id": cid}
    )
    publish = pamqp.commands.Basic.Publish(exchange=exchange, routing_key=key)
    return b"".join(
        (
            pamqp.frame.marshal(publish, channel),
            pamqp.frame.marshal(pamqp.header.ContentHeader(0, len(body), properties), channel),
            pamqp.frame.marshal(pamqp.body.ContentBody(body), channel),
        )
    )


def test_template_frames_are_what_pamqp_marshals() -> None:
    frames = Frames(3, "ns.lifecycle", "warm.completed")
    for cid, token in (("a" * 32, 1), ("c-000001", 12345678901), ("b" * 32, 7), ("x", 2)):
        body = completion(cid, token)
        expected = _marshalled(3, "ns.lifecycle", "warm.completed", cid, body)
        assert frames.publish(cid, body) == expected


def test_a_parsed_frame_round_trips() -> None:
    body = completion("f" * 32, 99)
    data = Frames(1, "ns.warm", "warm.requested").publish("f" * 32, body)
    used, channel, method = pamqp.frame.unmarshal(data)
    assert channel == 1 and isinstance(method, pamqp.commands.Basic.Publish)
    data = data[used:]
    used, _, header = pamqp.frame.unmarshal(data)
    assert isinstance(header, pamqp.header.ContentHeader)
    assert header.body_size == len(body)
    assert header.properties.headers == {"conversation-id": "f" * 32}
    used, _, content = pamqp.frame.unmarshal(data[used:])
    assert isinstance(content, pamqp.body.ContentBody) and content.value == body


def test_series_are_summed_over_replicas_and_labels() -> None:
    one = {
        'warmer_warms_failed_total{cause="timeout",shard="0"}': 3.0,
        'warmer_warms_failed_total{cause="error",shard="0"}': 1.0,
        "warmer_warms_failed_totally": 100.0,
        "warmer_warms_requested_total": 10.0,
    }
    two = {'warmer_warms_failed_total{cause="timeout",shard="1"}': 2.0}
    assert total([one, two], "warmer_warms_failed_total") == 6.0
    assert total([one, two], 'warmer_warms_failed_total{cause="timeout"') == 5.0
    assert total([one], "warmer_warms_requested_total") == 10.0
    assert by_label([one, two], "warmer_warms_failed_total", "cause") == {
        "timeout": 5.0,
        "error": 1.0,
    }
