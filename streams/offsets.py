"""Which offset may be committed: pure bookkeeping of in-flight messages per partition.

A committed offset promises that every message before it is finished (its result or dead letter
delivered). Work completes out of order, so each partition keeps its consumed offsets in arrival
order and the commit point advances only over a finished prefix. A message dropped on revoke or
shutdown stays a barrier: the commit point never passes it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

TopicPartition = tuple[str, int]


@dataclass
class _PartitionOffsets:
    pending: deque[int] = field(default_factory=deque)
    finished: set[int] = field(default_factory=set)
    dropped: set[int] = field(default_factory=set)
    unsettled: int = 0
    next_commit: int | None = None

    def awaiting(self, offset: int) -> bool:
        """Consumed, and not yet reported (a second report of the same message is ignored)."""
        return (bool(self.pending) and offset >= self.pending[0]
                and offset not in self.finished and offset not in self.dropped)

    def advance(self) -> None:
        while self.pending and self.pending[0] in self.finished:
            offset = self.pending.popleft()
            self.finished.discard(offset)
            self.next_commit = offset + 1


class OffsetTracker:
    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, _PartitionOffsets] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._in_flight = 0  # sum of the partitions' unsettled counts, asked for once per message

    def consumed(self, tp: TopicPartition, offset: int) -> None:
        state = self._partitions.setdefault(tp, _PartitionOffsets())
        state.pending.append(offset)
        state.unsettled += 1
        self._in_flight += 1

    def finished(self, tp: TopicPartition, offset: int) -> None:
        """The message's outputs are delivered. Unknown partitions (revoked meanwhile) are ignored."""
        state = self._partitions.get(tp)
        if state is not None and state.awaiting(offset):
            state.finished.add(offset)
            state.unsettled -= 1
            self._in_flight -= 1
            state.advance()

    def dropped(self, tp: TopicPartition, offset: int) -> None:
        """The message was abandoned unfinished; it will be redelivered after the next assignment."""
        state = self._partitions.get(tp)
        if state is not None and state.awaiting(offset):
            state.dropped.add(offset)
            state.unsettled -= 1
            self._in_flight -= 1

    def unsettled(self, tp: TopicPartition) -> int:
        """Messages neither finished nor dropped."""
        state = self._partitions.get(tp)
        return 0 if state is None else state.unsettled

    def first_unfinished(self, tp: TopicPartition) -> int | None:
        """The oldest consumed offset not finished (open or dropped): where a re-read must start."""
        state = self._partitions.get(tp)
        return state.pending[0] if state is not None and state.pending else None

    def finished_beyond_commit(self, tp: TopicPartition) -> set[int]:
        """Finished offsets the commit point cannot pass yet (an earlier message is unfinished)."""
        state = self._partitions.get(tp)
        return set(state.finished) if state is not None else set()

    def in_flight(self) -> int:
        """Messages consumed but not yet finished or dropped, over all partitions (the backpressure gauge)."""
        return self._in_flight

    def to_commit(self, partitions: list[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Commit points that moved since they were last marked committed."""
        chosen = self._partitions if partitions is None else {tp: self._partitions[tp] for tp in partitions
                                                              if tp in self._partitions}
        return {tp: state.next_commit for tp, state in chosen.items()
                if state.next_commit is not None and self._committed.get(tp) != state.next_commit}

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            state = self._partitions.pop(tp, None)
            if state is not None:
                self._in_flight -= state.unsettled
            self._committed.pop(tp, None)
