"""A store in Redis: one hash of records and one token key, written by one atomic script.

``redis://[[user]:password@]host[:port][/db][?prefix=name]`` (``rediss://`` for TLS) keeps
the records in the hash ``{prefix}:conversations`` (field = conversation id, value = the
record), the token in the string ``{prefix}:token`` and each writer's entry (the sequence
of its last commit, ``warmer.store.base``) in the hash ``{prefix}:writers``; the prefix
defaults to ``warmer``.

With shards (``warmer.store.redis_shared``) shard 0 keeps that hash, so a store written
before shards loads unchanged, and shard k > 0 the hash ``{prefix}:conversations:{k}``; the
token and the writers stay one for the store. Each shard's owner is a field of the hash
``{prefix}:owners`` (field = the shard, value = ``epoch since_ms released replica``); the
commit script checks it beside the writer's entry (the fence, ``warmer.store.base``).

A commit is one round trip: a Lua script, which Redis runs atomically. It checks the
types of the keys, the stored token and the writer's entry before it writes anything,
because Redis never rolls back: neither a MULTI/EXEC transaction nor a script undoes the
writes made before a command failed. A commit is as durable as the server's persistence
makes it (``appendonly yes`` with ``appendfsync always`` for a commit fsynced before it
returns); ``open`` warns when the server keeps nothing.

A failure is known not to have written only when Redis answered (an error reply) or when
no connection could be made; any other failure (a timeout, a connection lost after
sending) is StoreOutcomeUnknown. redis-py's own retries are off: a command re-sent behind
our back would hide which of the two it was.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from warmer.observe.log import get_logger
from warmer.store.base import (
    MAX_SHARDS,
    MAX_TOKEN,
    WRITERS_KEPT,
    Loaded,
    StoreError,
    StoreFenced,
    StoreLost,
    StoreOutcomeUnknown,
    StoreUnreachable,
    check_commit,
    judge_epoch,
    new_writer,
    next_sequence,
    refresh_due,
    wall_ms,
)

log = get_logger(__name__)

DEFAULT_PREFIX = "warmer"
_PREFIX = re.compile(r"[\w.:{}-]{1,128}", re.ASCII)
_TOKEN = re.compile(rb"0|[1-9][0-9]{0,18}")
_DB = re.compile(r"/?|/\d{1,5}")
_FORM = "redis://[[user]:password@]host[:port][/db][?prefix=name] or rediss://..."
_SCAN_COUNT = 10_000
_RESTORE_CHUNK = 10_000
_LOST = "WARMERLOST"
_FENCED = "WARMERFENCED"
_BACKEND_ERRORS = (redis_errors.RedisError, OSError)

# KEYS: the records hash, the token string, the writers hash, the owners hash. ARGV: the
# token, the number of puts, the writer, the entry to write, the entry expected (see
# below), the shard, the fence, the owner entry a restore writes, the puts as id, record
# pairs, then the ids to delete. The fence: '' none (a store on its own); '=' and the
# view's epoch (a commit): the shard's epoch must be exactly it, WARMERFENCED when above,
# WARMERLOST when missing or below; '>' and the epoch (a restore): WARMERFENCED when above,
# else the owner entry is written again. Tokens are compared as decimal strings: a Lua number
# (a double) is exact only up to 2^53; sequences are milliseconds, well below it.
#
# An entry is the sequence of the writer's last commit, or 'r', the sequence the restore
# began at, '.' and a nonce while a restore in chunks is under way. Expected '' (registering):
# anything; '<' and a sequence (a restore's first chunk): anything, but an entry ranking at
# or above that sequence means a later write already landed and this is a late copy:
# ignored (0); an 'r' nonce: exactly it; a sequence: an entry at least as high. A commit
# whose sequence is not above the entry is a late copy of one already made: ignored (0).
_COMMIT = """
local records, token_key, writers, owners = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local kind = redis.call('TYPE', records)['ok']
if kind ~= 'none' and kind ~= 'hash' then
  return redis.error_reply('WRONGTYPE ' .. records .. ' holds a ' .. kind .. ', not a hash')
end
kind = redis.call('TYPE', token_key)['ok']
if kind ~= 'none' and kind ~= 'string' then
  return redis.error_reply('WRONGTYPE ' .. token_key .. ' holds a ' .. kind .. ', not a token')
end
kind = redis.call('TYPE', writers)['ok']
if kind ~= 'none' and kind ~= 'hash' then
  return redis.error_reply('WRONGTYPE ' .. writers .. ' holds a ' .. kind .. ', not a hash')
end
local stored = redis.call('GET', token_key)
if stored and not (stored == '0' or (string.match(stored, '^[1-9]%d*$')
    and (#stored < 19 or (#stored == 19 and stored <= '9223372036854775807')))) then
  return redis.error_reply('ERR ' .. token_key .. ' holds ' .. string.sub(stored, 1, 40)
    .. ', not a token')
end
local shard, fence = ARGV[6], ARGV[7]
local retake = false
if fence ~= '' then
  kind = redis.call('TYPE', owners)['ok']
  if kind ~= 'none' and kind ~= 'hash' then
    return redis.error_reply('WRONGTYPE ' .. owners .. ' holds a ' .. kind .. ', not a hash')
  end
  local owner = redis.call('HGET', owners, shard)
  local held = owner and tonumber(string.match(owner, '^(%d+) '))
  local mine = tonumber(string.sub(fence, 2))
  if held and held > mine then
    return redis.error_reply('WARMERFENCED shard ' .. shard .. ' was taken at epoch '
      .. string.format('%d', held) .. ', above ' .. string.format('%d', mine))
  end
  if held ~= mine then
    if string.sub(fence, 1, 1) == '=' then
      return redis.error_reply('WARMERLOST ' .. owners .. ' holds no epoch ' .. string.sub(fence, 2)
        .. ' for shard ' .. shard)
    end
    retake = true
  end
end
local writer, entry, expected = ARGV[3], ARGV[4], ARGV[5]
local held = redis.call('HGET', writers, writer)
local function sequence(value)
  if value and string.match(value, '^%d+$') then return tonumber(value) end
  return nil
end
if string.sub(expected, 1, 1) == '<' then
  local rank = sequence(held) or (held and tonumber(string.match(held, '^r(%d+)%.')))
  if rank and rank >= tonumber(string.sub(expected, 2)) then
    return 0
  end
elseif expected ~= '' then
  if not held then
    return redis.error_reply('WARMERLOST ' .. writers .. ' has no entry for writer ' .. writer)
  end
  local behind = held ~= expected
  if sequence(expected) then
    behind = not sequence(held) or sequence(held) < sequence(expected)
  end
  if behind then
    return redis.error_reply('WARMERLOST ' .. writers .. ' holds ' .. string.sub(held, 1, 40)
      .. ' for writer ' .. writer .. ', not ' .. expected)
  end
end
if sequence(held) and sequence(entry) and sequence(held) >= sequence(entry) then
  return 0
end
local token = ARGV[1]
if retake then
  redis.call('HSET', owners, shard, ARGV[8])
end
local first_delete = 9 + 2 * tonumber(ARGV[2])
-- unpack() is bounded by the Lua stack: write in chunks (of whole pairs for HSET).
for i = 9, first_delete - 1, 1000 do
  redis.call('HSET', records, unpack(ARGV, i, math.min(i + 999, first_delete - 1)))
end
for i = first_delete, #ARGV, 1000 do
  redis.call('HDEL', records, unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
if token ~= '0' and (not stored or #token > #stored
    or (#token == #stored and token > stored)) then
  redis.call('SET', token_key, token)
end
redis.call('HSET', writers, writer, entry)
return 1
"""


# KEYS: the owners hash. ARGV: the shard, the replica. Takes the shard: its epoch raised to
# max(stored + 1, the server's clock in ms), returned.
_TAKE = """
local owners, shard = KEYS[1], ARGV[1]
local kind = redis.call('TYPE', owners)['ok']
if kind ~= 'none' and kind ~= 'hash' then
  return redis.error_reply('WRONGTYPE ' .. owners .. ' holds a ' .. kind .. ', not a hash')
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local owner = redis.call('HGET', owners, shard)
local stored = owner and tonumber(string.match(owner, '^(%d+) ')) or 0
local epoch = math.max(stored + 1, now)
redis.call('HSET', owners, shard, string.format('%d %d 0 ', epoch, now) .. ARGV[2])
return epoch
"""

# KEYS: the owners hash. ARGV: the shard, the epoch. Marks the shard released when its
# epoch is still this one.
_RELEASE = """
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if not owner then return 0 end
local epoch, since, replica = string.match(owner, '^(%d+) (%d+) %d (.*)$')
if epoch ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], epoch .. ' ' .. since .. ' 1 ' .. replica)
return 1
"""


@dataclass
class RedisLink:
    """The client a ``RedisShared`` opens, which its views borrow (None while closed)."""

    client: Redis | None = None


def records_key(prefix: str, shard: int) -> str:
    """The hash of shard ``shard``'s records: shard 0's is the one a store had before
    shards existed."""
    if not 0 <= shard < MAX_SHARDS:
        raise ValueError(f"shard {shard} is outside 0..{MAX_SHARDS - 1}")
    return f"{prefix}:conversations" if shard == 0 else f"{prefix}:conversations:{shard}"


class RedisStore:
    """A Store in a Redis database, under a key prefix of its own.

    On its own (``RedisStore(url)``) it is shard 0, never fenced, with a client of its own;
    ``RedisShared.shard`` gives views that borrow the shared client and take their shard
    at ``open``.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 2.0,
        timeout: float = 2.0,
        scan_count: int = _SCAN_COUNT,
        link: RedisLink | None = None,
        shard: int = 0,
        replica: str | None = None,
    ) -> None:
        """Use the Redis ``url`` names; ValueError (never showing the password) when malformed.

        ``timeout``: how long a command may go unanswered before its outcome is unknown.
        A view of a ``RedisShared`` borrows its ``link`` and takes ``shard`` for ``replica``.
        """
        # self.url is the URL with its password masked: safe to log and to show.
        self._connect_url, self.prefix, self.url, self._secrets = _parse(url)
        self.shard = shard
        self.epoch = 0
        self._link = link
        self._replica = replica
        """Who takes the shard at ``open``: None for a store on its own (never fenced)."""
        self.records_key = records_key(self.prefix, shard)
        self.token_key = f"{self.prefix}:token"
        self.writers_key = f"{self.prefix}:writers"
        self.owners_key = f"{self.prefix}:owners"
        self.writer = new_writer()
        """This store's entry in ``writers_key``."""
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._scan_count = scan_count
        self._client: Redis | None = None
        self._script: AsyncScript | None = None
        self._sent = 0
        """The sequence of the last commit sent."""
        self._seen = 0
        """The sequence of the last commit acknowledged: the entry may not be below it."""
        # Commits leave in the order they were issued (a Lock is FIFO): on a pool of
        # connections, a later commit could otherwise overtake an earlier one.
        self._commits = asyncio.Lock()

    async def open(self) -> None:
        """Connect, check that Redis answers, record this writer; StoreError if not. A view
        borrows the shared client and takes its shard first."""
        if self._client is not None:
            return
        if self._link is not None:
            await self._open_view(self._link)
            return
        client = await self.connect()
        self._client = client
        self._script = client.register_script(_COMMIT)
        try:
            await self._forget_old_writers()
            async with self._commits:
                await self._run({}, 0, entry=str(self._next()), expected="")
        except BaseException:
            self._client = self._script = None
            await client.aclose()
            raise
        log.info("store_opened", url=self.url, prefix=self.prefix, writer=self.writer)

    async def connect(self) -> Redis:
        """A new client, once Redis answered and its persistence was checked (a warning
        when it keeps nothing); StoreUnreachable or StoreError if not. The caller closes it."""
        client: Redis = Redis.from_url(
            self._connect_url,
            decode_responses=False,
            socket_connect_timeout=self._connect_timeout,
            socket_timeout=self._timeout,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            await client.ping()
            await client.script_load(_COMMIT)
        except _BACKEND_ERRORS as exc:
            await client.aclose()
            error = self._error("cannot reach", exc)
            if _unreachable(exc):
                raise StoreUnreachable(str(error)) from exc
            raise error from exc
        except BaseException:
            await client.aclose()
            raise
        try:
            await self._persistence(client)
        except BaseException:
            await client.aclose()
            raise
        return client

    async def _open_view(self, link: RedisLink) -> None:
        if link.client is None:
            raise StoreError(f"redis store {self.url} is not open")
        self._client = link.client
        self._script = link.client.register_script(_COMMIT)
        try:
            await self._forget_old_writers()
            take = link.client.register_script(_TAKE)
            try:
                epoch = await take(keys=[self.owners_key], args=[self.shard, str(self._replica)])
            except _BACKEND_ERRORS as exc:
                raise self._error("cannot take the shard in", exc) from exc
            self.epoch = int(epoch)
            async with self._commits:
                await self._run({}, 0, entry=str(self._next()), expected="")
        except BaseException:
            self._client = self._script = None
            raise
        log.info("store_shard_taken", url=self.url, shard=self.shard, epoch=self.epoch)

    async def _persistence(self, client: Redis) -> None:
        """Warn when the server would come back empty, or lose the last second, on restart."""
        try:
            found = await client.config_get("appendonly")
            found |= await client.config_get("appendfsync")
            found |= await client.config_get("save")
        except redis_errors.ResponseError as exc:  # CONFIG renamed or refused (managed Redis)
            log.warning(
                "store_persistence_unknown",
                url=self.url,
                error=" ".join(str(exc).split())[:200],
                advice="could not check; make sure the server has appendonly yes",
            )
            return
        except _BACKEND_ERRORS as exc:
            raise self._error("cannot read the configuration of", exc) from exc
        config = {_text(key): _text(value) for key, value in found.items()}
        appendonly, snapshots = config.get("appendonly", ""), config.get("save", "")
        if appendonly != "yes":
            log.warning(
                "store_not_persistent",
                url=self.url,
                appendonly=appendonly,
                save=snapshots,
                loses="everything" if not snapshots else "what was committed since the last save",
                advice="set appendonly yes (appendfsync everysec or always) on the server",
            )
        else:
            log.info("store_persistence", url=self.url, appendfsync=config.get("appendfsync"))

    async def _forget_old_writers(self) -> None:
        """Keep the most recent entries, this one's to come included (killed workers leave
        theirs)."""
        client, _ = self._connection()
        keep = WRITERS_KEPT - 1
        try:
            if await client.hlen(self.writers_key) <= keep:  # type: ignore[misc]
                return
            entries = await client.hgetall(self.writers_key)  # type: ignore[misc]
            ranked = sorted(entries, key=lambda w: _rank(entries[w]))
            await client.hdel(self.writers_key, *ranked[: len(ranked) - keep])  # type: ignore[misc]
        except redis_errors.ResponseError:
            return  # another type of key: the commit script names it
        except _BACKEND_ERRORS as exc:
            raise self._error("cannot read", exc, key=self.writers_key) from exc

    async def close(self) -> None:
        """Let commits already issued finish, forget this writer, release the connections;
        twice is harmless."""
        async with self._commits:
            client, self._client, self._script = self._client, None, None
        if client is None:
            return
        try:
            # A late copy of a commit, finding no entry, is refused instead of landing.
            await client.hdel(self.writers_key, self.writer)  # type: ignore[misc]
            if self._replica is not None:
                release = client.register_script(_RELEASE)
                await release(keys=[self.owners_key], args=[self.shard, self.epoch])
        except _BACKEND_ERRORS as exc:
            log.info("store_writer_not_forgotten", url=self.url, error=str(exc)[:200])
        if self._link is not None:
            log.info("store_shard_released", url=self.url, shard=self.shard, epoch=self.epoch)
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
        async with self._commits:
            sequence = self._next()
            await self._run(changes, token, entry=str(sequence), expected=str(self._seen))
            self._seen = sequence

    async def check(self) -> None:
        """StoreLost when this writer's entry is missing or behind its last commit. An
        entry older than WRITER_REFRESH_MS is raised to now in the same script, so that a
        live writer, however long idle, is never forgotten by the starts of others."""
        client, _ = self._connection()
        if refresh_due(self._seen):
            async with self._commits:
                sequence = self._next()
                await self._run({}, 0, entry=str(sequence), expected=str(self._seen), doing="check")
                self._seen = sequence
            return
        try:
            async with client.pipeline(transaction=False) as pipe:
                pipe.hget(self.writers_key, self.writer)
                pipe.hget(self.owners_key, str(self.shard))
                held, owner = await pipe.execute()
        except redis_errors.ResponseError as exc:
            raise self._error("cannot check", exc, key=self.writers_key) from exc
        except _BACKEND_ERRORS as exc:
            raise self._error("cannot check", exc) from exc
        if self._replica is not None:
            judge_epoch(_epoch(owner), self.epoch, restoring=False, where=self._where())
        if held is None or not held.isdigit() or int(held) < self._seen:
            shown = "no entry" if held is None else f"{held[:40]!r}"
            raise StoreLost(
                f"redis store {self.url} lost writer {self.writer}'s data: "
                f"{self.writers_key} holds {shown}, not {self._seen} or above"
            )

    async def restore(self, records: Mapping[str, bytes], token: int) -> None:
        """Write every record again in chunks, then this writer's entry (see ``_COMMIT``)."""
        check_commit(records, token)
        items = list(records.items())
        chunks = [items[i : i + _RESTORE_CHUNK] for i in range(0, len(items), _RESTORE_CHUNK)]
        async with self._commits:
            # A late copy of the first chunk, landing after a later write of this writer,
            # is ignored: the entry then ranks at or above the restore's beginning.
            began = self._next()
            nonce = f"r{began}.{new_writer()}"
            last = len(chunks) - 1 if chunks else 0
            for index in range(last + 1):
                chunk = dict(chunks[index]) if chunks else {}
                final = self._next() if index == last else 0
                await self._run(
                    chunk,
                    token,
                    entry=str(final) if final else nonce,
                    expected=f"<{began}" if index == 0 else nonce,
                    restoring=True,
                )
                if final:
                    self._seen = final
                # Redis answers others between chunks.
                await asyncio.sleep(0)

    def _where(self) -> str:
        return f"redis store {self.url} shard {self.shard} ({self.owners_key})"

    def _fence(self, *, restoring: bool) -> list[str]:
        """The fence and owner arguments of the commit script (see ``_COMMIT``)."""
        if self._replica is None:
            return ["", ""]
        owner = f"{self.epoch} {wall_ms()} 0 {self._replica}"
        return [f"{'>' if restoring else '='}{self.epoch}", owner]

    def _next(self) -> int:
        self._sent = next_sequence(self._sent)
        return self._sent

    async def _run(
        self,
        changes: Mapping[str, bytes | None],
        token: int,
        *,
        entry: str,
        expected: str,
        doing: str = "commit to",
        restoring: bool = False,
    ) -> None:
        """One call of the commit script; the caller holds ``_commits``."""
        client, script = self._connection()
        puts: list[str | bytes] = []
        deletes: list[str] = []
        for conversation_id, record in changes.items():
            if record is None:
                deletes.append(conversation_id)
            else:
                puts += (conversation_id, record)
        try:
            await script(
                keys=[self.records_key, self.token_key, self.writers_key, self.owners_key],
                args=[
                    token,
                    len(puts) // 2,
                    self.writer,
                    entry,
                    expected,
                    self.shard,
                    *self._fence(restoring=restoring),
                    *puts,
                    *deletes,
                ],
                client=client,
            )
        except _BACKEND_ERRORS as exc:
            raise self._error(f"cannot {doing}", exc) from exc

    def _error(self, doing: str, exc: BaseException, *, key: str | None = None) -> StoreError:
        """One line naming the masked URL and what went wrong, without the password; of
        the kind that says whether anything may have been written."""
        reason = " ".join(str(exc).split()) or "no detail"
        if reason.startswith("WRONGTYPE Operation") and key is not None:
            reason = f"{key} holds another type of value than this store writes"
        for secret in self._secrets:
            reason = reason.replace(secret, "***")
        message = f"{doing} redis store {self.url}: {type(exc).__name__}: {reason}"
        if isinstance(exc, redis_errors.ResponseError) and reason.startswith(_FENCED):
            return StoreFenced(f"redis store {self.url}: {reason}")
        if isinstance(exc, redis_errors.ResponseError) and reason.startswith(_LOST):
            return StoreLost(f"redis store {self.url} lost writer {self.writer}'s data: {reason}")
        if _not_sent(exc):
            return StoreError(message)
        return StoreOutcomeUnknown(f"{message} (outcome unknown)")


def _not_sent(exc: BaseException) -> bool:
    """Whether a failure is known to have written nothing: Redis answered with an error
    (the script checks everything before it writes), or no connection could be made."""
    if isinstance(exc, redis_errors.ResponseError | redis_errors.AuthenticationError):
        return True
    # redis-py's words for a failed connect ("Error 111 connecting to host:port.",
    # "Timeout connecting to server"): nothing was sent on it.
    return isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError) and (
        "connecting to" in str(exc)
    )


def _epoch(owner: bytes | None) -> int | None:
    """The epoch in an owner entry (``epoch since_ms released replica``), None without one."""
    epoch = (owner or b"").partition(b" ")[0]
    return int(epoch) if epoch.isdigit() else None


def _rank(entry: bytes) -> int:
    """How recent a writer's entry is: its sequence, or for a restore under way (``r``,
    the sequence it began at, ``.``, a nonce) that sequence; 0 for anything else."""
    sequence = entry[1:].partition(b".")[0] if entry.startswith(b"r") else entry
    return int(sequence) if sequence.isdigit() else 0


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


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


def _unreachable(exc: BaseException) -> bool:
    """No connection or no answer, which waiting may change; not refused credentials."""
    refused = (redis_errors.AuthenticationError, redis_errors.AuthorizationError)
    if isinstance(exc, refused):
        return False
    return isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError | OSError)


__all__ = ["DEFAULT_PREFIX", "RedisLink", "RedisStore", "records_key"]
