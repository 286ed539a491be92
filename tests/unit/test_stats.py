"""Histogram buckets: Prometheus' rule, an observation counts in the first bucket whose upper
bound is at least the value (bounds inclusive), and past the last bound in +Inf."""

import pytest

from pgproxy.core.stats import DURATION_BUCKETS, Histogram


@pytest.mark.parametrize(
    ("value", "bucket"),
    [
        (0.0, 0),
        (-0.001, 0),  # a clock step backwards still counts, in the first bucket
        (0.0005, 0),  # on a bound: that bound's bucket
        (0.0005001, 1),
        (0.001, 1),
        (0.3, DURATION_BUCKETS.index(0.5)),
        (300.0, len(DURATION_BUCKETS) - 1),
        (300.1, len(DURATION_BUCKETS)),  # +Inf
    ],
)
def test_an_observation_lands_in_the_first_bucket_whose_bound_holds_it(value, bucket):
    histogram = Histogram()
    histogram.observe(value)
    assert histogram.counts.index(1) == bucket
    assert (histogram.count, histogram.sum) == (1, value)


def test_cumulative_counts_end_with_inf_and_the_total():
    histogram = Histogram()
    for value in (0.0001, 0.002, 0.002, 7.0, 1000.0):
        histogram.observe(value)
    histogram.observe_nothing()
    cumulative = dict(histogram.cumulative())
    assert cumulative[0.0005] == 2
    assert cumulative[0.0025] == 4
    assert cumulative[10.0] == 5
    assert cumulative[float("inf")] == histogram.count == 6
