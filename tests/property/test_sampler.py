"""Length-bucketed batching: every example once, budget respected, order a function of the epoch."""

from hypothesis import given, settings
from hypothesis import strategies as st

from d2v.data.loading import BucketBatchSampler

lengths_st = st.lists(st.integers(min_value=1, max_value=500), min_size=1, max_size=200)


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_st, budget=st.integers(min_value=500, max_value=4000), seed=st.integers(0, 10))
def test_budget_respected_and_every_index_once(lengths, budget, seed):
    sampler = BucketBatchSampler(lengths, max_length=budget, seed=seed)
    batches = list(sampler)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for batch in batches:
        assert max(lengths[i] for i in batch) * len(batch) <= budget
    assert len(sampler) == len(batches)


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_st, size=st.integers(1, 16))
def test_fixed_batch_size(lengths, size):
    batches = list(BucketBatchSampler(lengths, batch_size=size, shuffle=False))
    assert all(len(b) == size for b in batches[:-1]) and 1 <= len(batches[-1]) <= size


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 100), min_size=20, max_size=100), seed=st.integers(0, 100))
def test_order_is_deterministic_per_epoch(lengths, seed):
    a = BucketBatchSampler(lengths, batch_size=2, seed=seed)
    b = BucketBatchSampler(lengths, batch_size=2, seed=seed)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert sorted(map(tuple, a)) == sorted(map(tuple, b))
