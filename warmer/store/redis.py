"""A store in Redis: one hash of records and one token key, written by one atomic script.

``redis://[[user]:password@]host[:port][/db][?prefix=name]`` (``rediss://`` for TLS) keeps
the records in the hash ``{prefix}:conversations`` (field = conversation id, value = the
record) and the token in the string ``{prefix}:token``; the prefix defaults to ``warmer``.

A commit is one round trip: a Lua script, which Redis runs atomically. It checks the
types of both keys and the stored token before it writes anything, because Redis never
rolls back: neither a MULTI/EXEC transaction nor a script undoes the writes made before a
command failed. A commit is as durable as the server's persistence makes it
(``appendonly yes`` with ``appendfsync always`` for a commit fsynced before it returns).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from warmer.observe.log import get_logger
from warmer.store.base import MAX_TOKEN, Loaded, StoreError, check_commit

log = get_logger(__name__)

DEFAULT_PREFIX = "warmer"
_PREFIX = re.compile(r"[\w.:{}-]{1,128}", re.ASCII)
_TOKEN = re.compile(rb"0|[1-9][0-9]{0,18}")
_DB = re.compile(r"/?|/\d{1,5}")
_FORM = "redis://[[user]:password@]host[:port][/db][?prefix=name] or rediss://..."
_SCAN_COUNT = 10_000
_BACKEND_ERRORS = (redis_errors.RedisError, OSError)

# KEYS: the records hash, the token string. ARGV: the token, the number of puts, the puts
# as id, record pairs, then the ids to delete. Tokens are compared as decimal strings: a
# Lua number (a double) is exact only up to 2^53.
_COMMIT = """
local records, token_key = KEYS[1], KEYS[2]
local kind = redis.call('TYPE', records)['ok']
if kind ~= 'none' and kind ~= 'hash' then
  return redis.error_reply('WRONGTYPE ' .. records .. ' holds a ' .. kind .. ', not a hash')
end
kind = redis.call('TYPE', token_key)['ok']
if kind ~= 'none' and kind ~= 'string' then
  return redis.error_reply('WRONGTYPE ' .. token_key .. ' holds a ' .. kind .. ', not a token')
end
local stored = redis.call('GET', token_key)
if stored and not (stored == '0' or (string.match(stored, '^[1-9]%d*$')
    and (#stored < 19 or (#stored == 19 and stored <= '9223372036854775807')))) then
  return redis.error_reply('ERR ' .. token_key .. ' holds ' .. string.sub(stored, 1, 40)
    .. ', not a token')
end
local token = ARGV[1]
local first_delete = 3 + 2 * tonumber(ARGV[2])
-- unpack() is bounded by the Lua stack: write in chunks (of whole pairs for HSET).
for i = 3, first_delete - 1, 1000 do
  redis.call('HSET', records, unpack(ARGV, i, math.min(i + 999, first_delete - 1)))
end
for i = first_delete, #ARGV, 1000 do
  redis.call('HDEL', records, unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
if not stored or #token > #stored or (#token == #stored and token > stored) then
  redis.call('SET', token_key, token)
end
return 1
"""


class RedisStore:
    """A Store in a Redis database, under a key prefix of its own."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        timeout: float = 10.0,
        scan_count: int = _SCAN_COUNT,
    ) -> None:
        """Use the Redis ``url`` names; ValueError (never showing the password) when malformed."""
        # self.url is the URL with its password masked: safe to log and to show.
        self._connect_url, self.prefix, self.url, self._secrets = _parse(url)
        self.records_key = f"{self.prefix}:conversations"
        self.token_key = f"{self.prefix}:token"
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._scan_count = scan_count
        self._client: Redis | None = None
        self._script: AsyncScript | None = None
        # Commits leave in the order they were issued (a Lock is FIFO): on a pool of
        # connections, a later commit could otherwise overtake an earlier one.
        self._commits = asyncio.Lock()

    async def open(self) -> None:
        """Connect and check that Redis answers; StoreError naming the (masked) URL if not."""
        if self._client is not None:
            return
        client = Redis.from_url(
            self._connect_url,
            decode_responses=False,
            socket_connect_timeout=self._connect_timeout,
            socket_timeout=self._timeout,
            # One immediate retry, on a broken connection only: it replaces a pooled
            # connection the server closed (a restart). A timeout is reported, not repeated.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis_errors.ConnectionError,)),
        )
        try:
            await client.ping()
            script = client.register_script(_COMMIT)
            await client.script_load(script.script)
        except _BACKEND_ERRORS as exc:
            await client.aclose()
            raise self._error("cannot reach", exc) from exc
        except BaseException:
            await client.aclose()
            raise
        self._client = client
        self._script = script
        log.info("store_opened", url=self.url, prefix=self.prefix)

    async def close(self) -> None:
        """Let commits already issued finish, then release the connections; twice is harmless."""
        async with self._commits:
            client, self._client, self._script = self._client, None, None
        if client is None:
            return
        try:
            await client.aclose()
        except _BACKEND_ERRORS as exc:
            raise self._error("cannot close", exc) from exc
        log.info("store_closed", url=self.url)

    def _connection(self) -> tuple[Redis, AsyncScript]:
        if self._client is None or self._script is None:
            raise StoreError(f"redis store {self.url} is not open")
        return self._client, self._script

    async def load(self) -> Loaded:
        """Every record (HSCAN, in chunks: Redis keeps answering others), then the token."""
        client, _ = self._connection()
        chunks: list[dict[bytes, bytes]] = []
        cursor = 0
        # The token is read last: every record seen was committed with a token it covers.
        try:
            while True:
                cursor, chunk = await client.hscan(self.records_key, cursor, count=self._scan_count)
                chunks.append(chunk)
                if cursor == 0:
                    break
        except _BACKEND_ERRORS as exc:
            raise self._error("cannot read", exc, key=self.records_key) from exc
        try:
            raw_token = await client.get(self.token_key)
        except _BACKEND_ERRORS as exc:
            raise self._error("cannot read", exc, key=self.token_key) from exc
        records: dict[str, bytes] = {}
        try:
            for chunk in chunks:
                # A dict's keys and values come in the same order.
                records.update(zip(map(bytes.decode, chunk), chunk.values(), strict=True))
        except UnicodeDecodeError as exc:
            raise StoreError(
                f"redis store {self.url}: {self.records_key} holds a conversation id "
                f"that is not UTF-8 ({exc.object[:60]!r})"
            ) from exc
        return Loaded(records=records, settings={}, token=self._token(raw_token))

    def _token(self, raw: bytes | None) -> int:
        if raw is None:
            return 0
        # As strict as the commit script: a decimal integer without leading zeros.
        if _TOKEN.fullmatch(raw) and int(raw) <= MAX_TOKEN:
            return int(raw)
        raise StoreError(
            f"redis store {self.url}: {self.token_key} holds {raw[:40]!r}, not a token"
        )

    async def commit(self, changes: Mapping[str, bytes | None], token: int) -> None:
        """Put and delete records, raise the token: one atomic script, one round trip."""
        check_commit(changes, token)
        self._connection()  # fail before building the arguments
        puts: list[str | bytes] = []
        deletes: list[str] = []
        for conversation_id, record in changes.items():
            if record is None:
                deletes.append(conversation_id)
            else:
                puts += (conversation_id, record)
        try:
            async with self._commits:
                client, script = self._connection()
                await script(
                    keys=[self.records_key, self.token_key],
                    args=[token, len(puts) // 2, *puts, *deletes],
                    client=client,
                )
        except _BACKEND_ERRORS as exc:
            # A timeout leaves the outcome unknown; the commit is idempotent, so the
            # worker's retry of it is safe either way.
            raise self._error("cannot commit to", exc) from exc

    def _error(self, doing: str, exc: BaseException, *, key: str | None = None) -> StoreError:
        """One line naming the masked URL and what went wrong, without the password."""
        reason = " ".join(str(exc).split()) or "no detail"
        if reason.startswith("WRONGTYPE Operation") and key is not None:
            reason = f"{key} holds another type of value than this store writes"
        for secret in self._secrets:
            reason = reason.replace(secret, "***")
        return StoreError(f"{doing} redis store {self.url}: {type(exc).__name__}: {reason}")


def _parse(url: str) -> tuple[str, str, str, tuple[str, ...]]:
    """The URL to connect to, the key prefix, the masked URL, and the secrets to mask."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(f"malformed redis store URL; use {_FORM}") from None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    masked_netloc = f"{user}:***@{hostport}" if colon else parts.netloc
    secrets = tuple(sorted({password, unquote(password)} - {""}, key=len, reverse=True))
    masked = urlunsplit((parts.scheme, masked_netloc, parts.path, parts.query, ""))
    if parts.scheme.lower() not in ("redis", "rediss"):
        raise ValueError(f"not a redis store URL: {masked}; use {_FORM}")
    try:
        host, _port = parts.hostname, parts.port  # .port raises on a port that is no number
    except ValueError:
        raise ValueError(f"redis store URL has a bad port: {masked}; use {_FORM}") from None
    if not host:
        raise ValueError(f"redis store URL names no host: {masked}; use {_FORM}")
    if not _DB.fullmatch(parts.path):
        raise ValueError(f"redis store URL path is not a database number: {masked}")
    if parts.fragment:
        raise ValueError(f"redis store URL has a fragment: {masked}")
    query = parse_qs(parts.query, keep_blank_values=True)
    if set(query) - {"prefix"}:
        raise ValueError(f"redis store URL takes only ?prefix=name: {masked}")
    prefixes = query.get("prefix", [DEFAULT_PREFIX])
    if len(prefixes) != 1 or not _PREFIX.fullmatch(prefixes[0]):
        raise ValueError(
            f"redis store URL prefix must be 1 to 128 of letters, digits, _.:{{}}-: {masked}"
        )
    connect = urlunsplit((parts.scheme.lower(), parts.netloc, parts.path, "", ""))
    return connect, prefixes[0], masked, secrets


__all__ = ["DEFAULT_PREFIX", "RedisStore"]
