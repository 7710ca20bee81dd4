import random

from emofleet.processors.batch_plan import plan_batches


def _check_plan(lengths: list[int], plan: list[list[int]], max_clips: int, max_padded: int, max_padding: float) -> None:
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths))), "every clip exactly once"
    for batch in plan:
        longest = max(lengths[i] for i in batch)
        padded = longest * len(batch)
        assert len(batch) <= max_clips
        assert len(batch) == 1 or padded <= max_padded
        assert len(batch) == 1 or (padded - sum(lengths[i] for i in batch)) / padded <= max_padding + 1e-9


def test_plans_respect_every_bound_on_random_lengths() -> None:
    rng = random.Random(7)
    for _ in range(200):
        lengths = [rng.randint(400, 16_000 * 30) for _ in range(rng.randint(1, 60))]
        plan = plan_batches(lengths, max_clips=8, max_padded_samples=16_000 * 120, max_padding=0.15)
        _check_plan(lengths, plan, 8, 16_000 * 120, 0.15)


def test_equal_lengths_fill_batches_and_mixed_lengths_split() -> None:
    assert plan_batches([100] * 10, max_clips=4, max_padded_samples=10_000) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert plan_batches([100, 1000, 110, 990], max_clips=8, max_padded_samples=10_000) == [[0, 2], [3, 1]]


def test_a_clip_larger_than_the_padded_cap_still_gets_its_own_batch() -> None:
    assert plan_batches([50, 5_000], max_clips=8, max_padded_samples=1_000) == [[0], [1]]


def test_attention_cap_bounds_count_times_longest_squared() -> None:
    second = 16_000
    lengths = [10 * second] * 6 + [2 * second] * 6  # 10 s and 2 s clips
    loose = dict(max_clips=16, max_padded_samples=16_000 * 240)
    assert plan_batches(lengths, **loose) == plan_batches(lengths, **loose, max_attention=None)
    assert [len(b) for b in plan_batches(lengths, **loose)] == [6, 6]
    cap = 200 * second**2  # 200 s^2: two 10 s clips (2 x 100), but all six 2 s clips (6 x 4)
    plan = plan_batches(lengths, **loose, max_attention=cap)
    assert [len(b) for b in plan] == [6, 2, 2, 2]
    for batch in plan:
        assert len(batch) * max(lengths[i] for i in batch) ** 2 <= cap
    # A clip over the cap on its own still gets a batch; every clip appears exactly once.
    assert plan_batches([40 * second, second], **loose, max_attention=cap) == [[1], [0]]
    rng = random.Random(3)
    for _ in range(100):
        lengths = [rng.randint(400, 16_000 * 30) for _ in range(rng.randint(1, 40))]
        plan = plan_batches(lengths, max_clips=8, max_padded_samples=16_000 * 240, max_padding=0.5,
                            max_attention=1_000 * second**2)
        _check_plan(lengths, plan, 8, 16_000 * 240, 0.5)
        for batch in plan:
            assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) ** 2 <= 1_000 * second**2
