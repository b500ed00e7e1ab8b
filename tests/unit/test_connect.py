"""The broker URL the worker connects with, and which refusals are for good."""

from __future__ import annotations

import aiormq
from yarl import URL

from warmer.app import _amqp_url, _refusal


def test_the_heartbeat_and_reconnect_interval_are_added_unless_the_url_says() -> None:
    url = _amqp_url("amqp://u:p@rabbit:5672/vh", 10)
    assert url.query["heartbeat"] == "10" and url.query["reconnect_interval"] == "1"
    assert url.with_query(None) == URL("amqp://u:p@rabbit:5672/vh")

    url = _amqp_url("amqp://rabbit/?heartbeat=30&name=x", 10)
    assert dict(url.query) == {"heartbeat": "30", "name": "x", "reconnect_interval": "1"}

    given = "amqp://rabbit/?heartbeat=5&reconnect_interval=3"
    assert _amqp_url(given, 10) == URL(given)


def test_refused_credentials_and_a_missing_vhost_are_for_good_the_rest_is_retried() -> None:
    assert _refusal(aiormq.exceptions.ProbableAuthenticationError("x")) == "credentials"
    assert _refusal(aiormq.exceptions.AuthenticationError("x")) == "credentials"
    closed = aiormq.exceptions.InvalidFrameError("<Connection.Close reply_code=530>")
    assert _refusal(closed) == "vhost"
    assert _refusal(aiormq.exceptions.AMQPConnectionError("reset")) is None
    assert _refusal(ConnectionRefusedError(111, "refused")) is None
    assert _refusal(TimeoutError()) is None
