"""Start-up errors name their cause: refused credentials, a missing vhost, no broker."""

from __future__ import annotations

from pathlib import Path

import pytest
from yarl import URL

from tests.integration.conftest import make_config
from warmer.app import App, StartupError

pytestmark = pytest.mark.broker


async def start_with(url: str, namespace: str, tmp_path: Path) -> str:
    """The one line start-up fails with; the password never in it."""
    app = App(make_config(url, namespace, tmp_path))
    try:
        with pytest.raises(StartupError) as raised:
            await app.start()
    finally:
        await app.store.close()
    text = str(raised.value)
    assert "\n" not in text
    assert "s3cr3t" not in text
    return text


async def test_refused_credentials_say_so(amqp_url: str, namespace: str, tmp_path: Path) -> None:
    url = str(URL(amqp_url).with_password("s3cr3t"))
    text = await start_with(url, namespace, tmp_path)
    assert "refused the credentials of user 'guest'" in text
    assert "start a broker" not in text


async def test_a_missing_vhost_says_so(amqp_url: str, namespace: str, tmp_path: Path) -> None:
    url = str(URL(amqp_url).with_path("/no-such-vhost-here"))
    text = await start_with(url, namespace, tmp_path)
    assert "virtual host 'no-such-vhost-here'" in text


async def test_an_unreachable_host_says_so(namespace: str, tmp_path: Path) -> None:
    text = await start_with("amqp://guest:s3cr3t@127.0.0.1:1/", namespace, tmp_path)
    assert "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/" in text
    assert "start a broker" in text
