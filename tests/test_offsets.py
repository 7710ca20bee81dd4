from emofleet.streams.offsets import OffsetTracker

A = ("audio", 0)
B = ("audio", 1)


def test_commit_point_advances_only_over_a_finished_prefix() -> None:
    tracker = OffsetTracker()
    for offset in (10, 11, 12, 13):
        tracker.consumed(A, offset)

    tracker.finished(A, 12)
    assert tracker.to_commit() == {}, "12 is done but 10 is not"
    tracker.finished(A, 10)
    assert tracker.to_commit() == {A: 11}
    tracker.finished(A, 11)
    assert tracker.to_commit() == {A: 13}
    assert tracker.in_flight() == 1


def test_dropped_messages_are_a_barrier_and_not_in_flight() -> None:
    tracker = OffsetTracker()
    for offset in (0, 1, 2):
        tracker.consumed(A, offset)
    tracker.dropped(A, 1)
    tracker.finished(A, 0)
    tracker.finished(A, 2)

    assert tracker.to_commit() == {A: 1}, "never past the dropped message"
    assert tracker.in_flight() == 0


def test_reports_are_idempotent_and_committed_points_are_not_repeated() -> None:
    tracker = OffsetTracker()
    tracker.consumed(A, 5)
    tracker.consumed(B, 7)
    tracker.finished(A, 5)
    tracker.finished(A, 5)
    tracker.dropped(A, 5)

    assert tracker.in_flight() == 1
    assert tracker.to_commit() == {A: 6}
    tracker.mark_committed({A: 6})
    assert tracker.to_commit() == {}
    tracker.finished(B, 7)
    assert tracker.to_commit([B]) == {B: 8}


def test_forgotten_partitions_ignore_late_reports() -> None:
    tracker = OffsetTracker()
    tracker.consumed(A, 1)
    tracker.forget([A])
    tracker.finished(A, 1)

    assert tracker.to_commit() == {} and tracker.unsettled(A) == 0
