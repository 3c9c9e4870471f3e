"""Aggregating the metrics clients report (fl_clip21.flower.metrics): FedAvg's average, hostile values left out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fl_clip21.flower.metrics import aggregate


def test_weighted_by_num_examples_as_fedavg():
    got = aggregate([{"loss": 1.0, "num-examples": 1}, {"loss": 4.0, "num-examples": 3}])
    assert got == {"loss": pytest.approx(3.25)}


def test_unweighted_when_a_weight_is_missing_or_not_positive():
    assert aggregate([{"loss": 1.0, "num-examples": 1}, {"loss": 3.0}]) == {"loss": 2.0}
    assert aggregate([{"loss": 1.0, "num-examples": 0}, {"loss": 3.0, "num-examples": 5}]) == {"loss": 2.0}


def test_lists_average_elementwise_and_mismatched_lengths_are_left_out():
    got = aggregate([{"acc": [1.0, 0.0]}, {"acc": [0.0, 1.0]}, {"acc": [5.0]}])
    assert got == {"acc": [0.5, 0.5]}


def test_keys_some_clients_do_not_send_average_over_those_that_do():
    assert aggregate([{"a": 1.0}, {"b": 2.0}, {"a": 3.0}]) == {"a": 2.0, "b": 2.0}


_values = st.one_of(st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
                    st.lists(st.floats(allow_nan=True), max_size=3), st.text(max_size=3), st.none())


@given(st.lists(st.dictionaries(st.sampled_from(["loss", "acc", "num-examples"]), _values, max_size=3), max_size=5))
def test_any_values_aggregate_without_an_exception_to_finite_numbers(records):
    for value in aggregate(records).values():
        for v in value if isinstance(value, list) else [value]:
            assert isinstance(v, float) and v == v and abs(v) != float("inf")
