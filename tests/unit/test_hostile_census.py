"""The census (warmer.core.census) against a walk, through the REAL worker (``Shell``):
random hostile sequences of events, commands (refused ones and ones whose commit fails),
timers, returns, prunes and restarts, with a scrape in the middle of every commit (the
store reads the counts between apply and commit, then may fail it).

After every batch: the kept counts equal a walk over the core's conversations, and the
census holds nothing back (its set of touched ids is empty: no growth between batches).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from tests.unit.conftest import Shell, build_usage
from warmer.bus.memory import MemoryChannel
from warmer.contract import Status
from warmer.core import Policy
from warmer.inputs import Prune, Received
from warmer.store import StoreError

_IDS = ("a", "b", "c")
_HOSTILE_COMMANDS = (
    b'{"type":"set_enabled","conversationId":"a","enabled":"x","enabled":true}',
    b'{"type":"set_interval","conversationId":"b","intervalMs":1e400}',
    b'{"type":"set_interval","conversationId":"c","intervalMs":"x","intervalMs":-1e400}',
    b'{"type":"get_state","type":"bogus","conversationId":"a"}',
    b'{"type":"set_enabled","conversationId":"a\\n","enabled":true}',
    b'{"type":"surface.action","conversationId":"b","actionId":"set-interval","payload":1e400}',
    b'{"type":"surface.action","conversationId":"c","actionId":"toggle","payload":5}',
    b"not json",
)

Walk = tuple[Counter[Status], tuple[int, int, int]]


def _walk(shell: Shell) -> Walk:
    convs = list(shell.warmer._conversations.values())
    spent = sum(c.spent for c in convs)
    avoided = sum(c.avoided for c in convs)
    missed = sum(c.missed for c in convs)
    return Counter(c.status for c in convs), (spent, avoided, missed)


def _kept(shell: Shell) -> Walk:
    return shell.warmer.statuses(), shell.warmer.savings()


def _scraped_in_commit(shell: Shell, fail: list[str]) -> None:
    """The store's commit reads the counts first (a scrape between apply and commit; the
    walk then sees the batch's changes, not yet committed), then fails when told: "gone"
    also closes the lifecycle channel, so the worker abandons the batch (rolled back)."""
    inner = shell.store.commit

    async def commit(changes: Mapping[str, bytes | None], token: int) -> None:
        assert _kept(shell) == _walk(shell), "a scrape in the middle of a commit"
        if fail:
            error = fail.pop()
            if error == "gone":
                shell.lifecycle.close()
            raise StoreError(error)
        await inner(changes, token)

    shell.store.commit = commit  # type: ignore[method-assign]


_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("enable"), st.sampled_from(_IDS), st.booleans(), st.booleans()),
        st.tuples(st.just("interval"), st.sampled_from(_IDS), st.integers(-5, 10**9)),
        st.tuples(st.just("settled"), st.sampled_from(_IDS), st.sampled_from([None, 0, 300])),
        st.tuples(st.just("started"), st.sampled_from(_IDS)),
        st.tuples(st.just("closed"), st.sampled_from(_IDS)),
        st.tuples(st.just("fire"), st.sampled_from(_IDS)),
        st.tuples(st.just("returned"), st.sampled_from(_IDS)),
        st.tuples(st.just("completed"), st.sampled_from(_IDS), st.integers(0, 6_000)),
        st.tuples(st.just("failed"), st.sampled_from(_IDS)),
        st.tuples(st.just("hostile"), st.sampled_from(_HOSTILE_COMMANDS)),
        st.tuples(st.just("advance"), st.integers(0, 300_000) | st.just(3 * 3_600_000)),
        st.tuples(st.just("prune")),
        st.tuples(st.just("abandoned"), st.sampled_from(_IDS)),
        st.tuples(st.just("restart")),
    ),
    max_size=25,
)


@settings(max_examples=400, deadline=None)
@given(steps=_STEPS)
@example(
    steps=[
        ("settled", "a", 300),
        ("enable", "b", True, False),
        ("settled", "b", 300),
        ("advance", 3 * 3_600_000),
        ("abandoned", "b"),  # a prune rolled back: both come back
        ("prune",),
        ("restart",),
        ("enable", "a", True, True),
        ("prune",),
    ]
)
def test_the_census_equals_a_walk_through_the_real_worker(steps: list[tuple[Any, ...]]) -> None:
    policy = Policy(retention_ms=2 * 3_600_000)
    shell = Shell(policy)
    fail: list[str] = []
    _scraped_in_commit(shell, fail)
    for step in steps:
        match step:
            case ("enable", cid, enabled, store_fails):
                shell.set_enabled(cid, enabled, store_error="down" if store_fails else "")
            case ("interval", cid, interval):
                shell.set_interval(cid, interval)
            case ("settled", cid, ttl):
                usage = build_usage(5_000, 4_000, 100)
                shell.settled(cid, cache_ttl_s=ttl, usage=usage)
            case ("started", cid):
                shell.started(cid)
            case ("closed", cid):
                shell.closed(cid)
            case ("fire", cid):
                if shell.scheduler.pending(cid) is not None:
                    shell.fire(cid)
            case ("returned", cid):
                if shell.warms:
                    shell.returned(shell.last_warm.conversation_id)
            case ("completed", cid, read):
                conv = shell.warmer.get(cid)
                token = None if conv is None else conv.token
                shell.completed(cid, token=token or None, usage=build_usage(5_000, read, 10))
            case ("failed", cid):
                conv = shell.warmer.get(cid)
                token = None if conv is None else conv.token
                shell.completed(cid, token=token or None, error="provider said no")
            case ("hostile", body):
                delivery = shell.commands.deliver(body, reply_to="replies")
                shell._run(shell._batch(Received("commands", delivery)))
            case ("advance", ms):
                shell.advance(ms)
            case ("prune",):
                known = len(shell.warmer)
                shell._run(shell.worker.run_batch([Prune()]))
                event(f"pruned some: {len(shell.warmer) < known}")
            case ("abandoned", cid):
                # A settle and a prune in one batch whose commit fails as the channel goes:
                # the worker rolls the whole batch back.
                fail.append("gone")
                delivery = shell.lifecycle.deliver({"type": "turn.settled", "conversationId": cid})
                before = _walk(shell)
                shell._run(shell.worker.run_batch([Received("lifecycle", delivery), Prune()]))
                event(f"abandoned batch failed its commit: {not fail}")
                if not fail:  # it had something to commit
                    assert _walk(shell) == before, "rolled back"
                fail.clear()
                shell.lifecycle = MemoryChannel("lifecycle")
            case ("restart",):
                shell.store.commit = type(shell.store).commit.__get__(shell.store)  # type: ignore[method-assign]
                shell = shell.restarted(shell.now)
                _scraped_in_commit(shell, fail)
        event(f"step {step[0]}")
        assert not shell.warmer._census._out, "the census holds touched ids between batches"
        assert _kept(shell) == _walk(shell)
