"""The shards of one Redis prefix: views on one client, layout, owners, presence, moves.

Keys beside those of ``warmer.store.redis`` (records of shard k in
``{prefix}:conversations`` for k = 0, ``{prefix}:conversations:{k}`` above; owners in the
hash ``{prefix}:owners``): the layout in the string ``{prefix}:layout``, presence in the
hash ``{prefix}:replicas`` (field = replica id, value = ``seen_ms expires_ms info``). Times
are the Redis server's clock (``TIME``), one clock for every replica whatever their hosts'.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from warmer.core.gaps import MODEL_KEY
from warmer.store.base import MAX_SHARDS, PRESENCE_INFO_CHARS, Owner, Replica, StoreError
from warmer.store.redis import RedisLink, RedisStore, records_key

T = TypeVar("T")

ASSIGN_CHUNK = 10_000
"""Moves written by one script call in ``assign`` (Redis answers others between them)."""

# KEYS: the replicas hash. ARGV: the replica, its info, the ttl in ms. Records the replica
# seen now (the server's clock), forgets every entry past its expiry; the live ones as
# id, seen_ms, info triples.
_BEAT = """
local replicas = KEYS[1]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('HSET', replicas, ARGV[1],
  string.format('%d %d ', now, now + tonumber(ARGV[3])) .. ARGV[2])
local entries = redis.call('HGETALL', replicas)
local live = {}
for i = 1, #entries, 2 do
  local seen, expires, info = string.match(entries[i + 1], '^(%d+) (%d+) (.*)$')
  if not seen or tonumber(expires) < now then
    redis.call('HDEL', replicas, entries[i])
  else
    live[#live + 1] = entries[i]
    live[#live + 1] = seen
    live[#live + 1] = info
  end
end
return live
"""

# KEYS: the records hashes a chunk moves between. ARGV: triples of conversation id, the
# index (1-based) in KEYS of the hash holding it, of the hash it goes to.
_MOVE = """
for i = 1, #ARGV, 3 do
  local source, target = KEYS[tonumber(ARGV[i + 1])], KEYS[tonumber(ARGV[i + 2])]
  local record = redis.call('HGET', source, ARGV[i])
  if record then
    redis.call('HSET', target, ARGV[i], record)
    redis.call('HDEL', source, ARGV[i])
  end
end
return 1
"""


class RedisShared:
    """A Shared store in a Redis database, under a key prefix of its own."""

    shareable = True

    def __init__(self, url: str, *, connect_timeout: float = 2.0, timeout: float = 2.0) -> None:
        """Use the Redis ``url`` names (``RedisStore``'s forms); ValueError when malformed."""
        self._url = url
        self._timeouts = (connect_timeout, timeout)
        # The store on its own at this URL (shard 0): it parses and checks the URL, names
        # the keys, and connects (with its checks and its errors) for ``open``.
        self._alone = RedisStore(url, connect_timeout=connect_timeout, timeout=timeout)
        self.url = self._alone.url
        self.prefix = self._alone.prefix
        self.layout_key = f"{self.prefix}:layout"
        self.replicas_key = f"{self.prefix}:replicas"
        self._link = RedisLink()

    async def open(self) -> None:
        """Connect and check that Redis answers (warning when it keeps nothing)."""
        if self._link.client is not None:
            return
        self._link.client = await self._alone.connect()

    async def close(self) -> None:
        """Release the client; views must be closed first."""
        client, self._link.client = self._link.client, None
        if client is not None:
            try:
                await client.aclose()
            except (redis_errors.RedisError, OSError) as exc:
                raise StoreError(f"cannot close redis store {self.url}: {exc}") from exc

    def shard(self, shard: int, replica: str) -> RedisStore:
        """A view of ``shard`` on the shared client, taken for ``replica`` at ``open``."""
        connect, timeout = self._timeouts
        return RedisStore(
            self._url,
            connect_timeout=connect,
            timeout=timeout,
            link=self._link,
            shard=shard,
            replica=replica,
        )

    def _client(self) -> Redis:
        if self._link.client is None:
            raise StoreError(f"redis store {self.url} is not open")
        return self._link.client

    async def layout(self) -> int | None:
        """The layout recorded; 1 for a prefix with records or a token but none; else None."""
        client = self._client()
        try:
            raw = await client.get(self.layout_key)
            if raw is not None:
                return int(raw)
            found = await client.exists(self._alone.records_key, self._alone.token_key)
        except (redis_errors.RedisError, OSError, ValueError) as exc:
            raise StoreError(f"cannot read the layout of redis store {self.url}: {exc}") from exc
        return 1 if found else None

    async def set_layout(self, shards: int) -> None:
        """Record the layout."""
        await self._call("cannot record the layout of", self._client().set(self.layout_key, shards))

    async def beat(self, replica: str, info: str, ttl_ms: int) -> list[Replica]:
        """Record ``replica`` alive for ``ttl_ms``, forget the expired: one script."""
        beat = self._client().register_script(_BEAT)
        live = await self._call(
            "cannot beat in",
            beat(keys=[self.replicas_key], args=[replica, info[:PRESENCE_INFO_CHARS], ttl_ms]),
        )
        replicas = [
            Replica(id=live[i].decode(), seen_ms=int(live[i + 1]), info=live[i + 2].decode())
            for i in range(0, len(live), 3)
        ]
        return sorted(replicas, key=lambda seen: seen.id)

    async def replicas(self) -> list[Replica]:
        """Every live replica (by the server's clock), by id."""
        client = self._client()
        seconds, micros = await self._call("cannot read the time of", client.time())
        now = seconds * 1000 + micros // 1000
        entries = await self._call(
            "cannot read the replicas in",
            client.hgetall(self.replicas_key),  # type: ignore[arg-type]
        )
        live = []
        for replica, value in entries.items():
            seen, expires, info = value.decode().split(" ", 2)
            if int(expires) >= now:
                live.append(Replica(id=replica.decode(), info=info, seen_ms=int(seen)))
        return sorted(live, key=lambda seen: seen.id)

    async def leave(self, replica: str) -> None:
        """Remove ``replica``'s presence."""
        await self._call("cannot leave", self._client().hdel(self.replicas_key, replica))  # type: ignore[arg-type]

    async def owners(self) -> list[Owner]:
        """Every shard ever taken, by shard."""
        entries = await self._call(
            "cannot read the owners in",
            self._client().hgetall(self._alone.owners_key),  # type: ignore[arg-type]
        )
        owners = []
        for shard, value in entries.items():
            epoch, since, released, replica = value.decode().split(" ", 3)
            owners.append(
                Owner(
                    shard=int(shard),
                    epoch=int(epoch),
                    replica=replica,
                    since_ms=int(since),
                    released=released == "1",
                )
            )
        return sorted(owners, key=lambda owner: owner.shard)

    async def ids(self, shard: int) -> list[str]:
        """The conversation ids of ``shard`` (HSCAN, in chunks)."""
        client, key = self._client(), records_key(self.prefix, shard)
        ids: list[str] = []
        cursor = 0
        try:
            while True:
                cursor, chunk = await client.hscan(key, cursor, count=ASSIGN_CHUNK)
                ids.extend(conversation_id.decode() for conversation_id in chunk)
                if cursor == 0:
                    return ids
        except (redis_errors.RedisError, OSError) as exc:
            raise StoreError(f"cannot read {key} in redis store {self.url}: {exc}") from exc

    async def assign(self, moves: Mapping[str, int]) -> None:
        """Move records between shard hashes: where each is found first (the hashes that
        exist, scanned once), then ``ASSIGN_CHUNK`` moves a script call."""
        client = self._client()
        try:
            async with client.pipeline(transaction=False) as pipe:
                for shard in range(MAX_SHARDS):
                    pipe.exists(records_key(self.prefix, shard))
                found = await pipe.execute()
        except (redis_errors.RedisError, OSError) as exc:
            raise StoreError(f"cannot read the shards of redis store {self.url}: {exc}") from exc
        where: dict[str, int] = {}
        for shard in [shard for shard, exists in enumerate(found) if exists]:
            for conversation_id in await self.ids(shard):
                where[conversation_id] = shard
        triples = [
            (cid, where[cid], target)
            for cid, target in moves.items()
            if cid != MODEL_KEY and cid in where and where[cid] != target
        ]
        move = client.register_script(_MOVE)
        for start in range(0, len(triples), ASSIGN_CHUNK):
            chunk = triples[start : start + ASSIGN_CHUNK]
            keys = sorted({shard for _, source, target in chunk for shard in (source, target)})
            index = {shard: n + 1 for n, shard in enumerate(keys)}
            args = [x for cid, s, t in chunk for x in (cid, index[s], index[t])]
            await self._call(
                "cannot move records in",
                move(keys=[records_key(self.prefix, shard) for shard in keys], args=args),
            )

    async def _call(self, doing: str, reply: Awaitable[T]) -> T:
        try:
            return await reply
        except (redis_errors.RedisError, OSError) as exc:
            raise StoreError(f"{doing} redis store {self.url}: {exc}") from exc


__all__ = ["ASSIGN_CHUNK", "RedisShared"]
