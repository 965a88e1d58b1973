"""Weights of the averaging schemes: invariants checked with hypothesis, values by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavg import scheme_weights
from wavg.averaging.schemes import parse_weight_list
from wavg.errors import UsageError

counts = st.integers(min_value=1, max_value=500)
alphas = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(n=counts, scheme=st.sampled_from(["equal", "linear", "exp"]), alpha=alphas)
def test_weights_are_positive_and_sum_to_one(n, scheme, alpha):
    w = scheme_weights(n, scheme, alpha)
    assert w.shape == (n,)
    assert (w >= 0).all() and w[-1] > 0
    assert math.isclose(w.sum(), 1.0, rel_tol=1e-12)


@given(n=counts, scheme=st.sampled_from(["linear", "exp"]), alpha=alphas)
def test_newer_checkpoints_never_weigh_less(n, scheme, alpha):
    w = scheme_weights(n, scheme, alpha)
    assert (np.diff(w) >= 0).all()


@given(raw=st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=50))
def test_custom_weights_are_normalised_in_file_order(raw):
    if sum(raw) == 0:
        with pytest.raises(UsageError, match="zero"):
            scheme_weights(len(raw), weights=raw)
        return
    w = scheme_weights(len(raw), weights=raw)
    assert math.isclose(w.sum(), 1.0, rel_tol=1e-12)
    np.testing.assert_allclose(w * sum(raw), raw, rtol=1e-9, atol=1e-300)


def test_linear_and_exp_match_the_case_study_formulas():
    n = 10
    i = np.arange(n, 0, -1)  # file order oldest first: i = n ... 1 (1 = newest)
    linear = (n - i + 1) / n
    np.testing.assert_allclose(scheme_weights(n, "linear"), linear / linear.sum())
    exp = np.exp(-i / 2.0)
    np.testing.assert_allclose(scheme_weights(n, "exp", 2.0), exp / exp.sum())
    np.testing.assert_allclose(scheme_weights(n, "equal"), np.full(n, 0.1))


def test_tiny_alpha_puts_all_weight_on_the_newest_instead_of_failing():
    w = scheme_weights(50, "exp", 1e-3)
    assert w[-1] == 1.0 and w[:-1].sum() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "at least one"),
        ({"n": 3, "scheme": "cosine"}, "unknown scheme"),
        ({"n": 3, "scheme": "exp", "alpha": 0.0}, "positive"),
        ({"n": 3, "scheme": "exp", "alpha": float("nan")}, "positive"),
        ({"n": 3, "scheme": "exp", "alpha": -1.0}, "positive"),
        ({"n": 3, "weights": [1, 2]}, "got 2 weights for 3"),
        ({"n": 2, "weights": [1, -1]}, "negative"),
        ({"n": 2, "weights": [0, 0]}, "zero"),
        ({"n": 2, "weights": [1, float("inf")]}, "finite"),
        ({"n": 2, "weights": [1, float("nan")]}, "finite"),
        ({"n": 2, "scheme": "linear", "weights": [1, 2]}, "not both"),
    ],
)
def test_impossible_weightings_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(UsageError, match=message):
        scheme_weights(**kwargs)


def test_weight_list_parsing_names_the_bad_item():
    assert parse_weight_list("1, 2,3.5") == [1.0, 2.0, 3.5]
    with pytest.raises(UsageError, match="'x'"):
        parse_weight_list("1,x,3")


WSM = ["wsm-linear", "wsm-cosine", "wsm-1-sqrt"]
DECAYS = {
    "wsm-linear": lambda x: 1 - x,
    "wsm-cosine": lambda x: (1 + math.cos(math.pi * x)) / 2,
    "wsm-1-sqrt": lambda x: 1 - math.sqrt(x),
}


@given(n=counts, scheme=st.sampled_from(WSM))
def test_wsm_weights_are_the_decay_differences_of_the_issue(n, scheme):
    """c_0 = 1 - w_1, c_j = w_j - w_{j+1}, c_k = w_k with w_i = d(i / n), k = n - 1."""
    d = DECAYS[scheme]
    w = [None, *(d(i / n) for i in range(1, n))]
    k = n - 1
    expected = [1.0] if n == 1 else [1 - w[1], *(w[j] - w[j + 1] for j in range(1, k)), w[k]]
    got = scheme_weights(n, scheme)
    assert got == pytest.approx(expected, abs=1e-12)
    assert (got >= 0).all()
    assert math.isclose(got.sum(), 1.0, rel_tol=1e-12)


@given(n=counts)
def test_wsm_linear_is_the_equal_average(n):
    assert scheme_weights(n, "wsm-linear") == pytest.approx(scheme_weights(n, "equal"), rel=1e-9)


@pytest.mark.parametrize("scheme", WSM)
def test_one_checkpoint_gets_weight_one_under_wsm(scheme):
    assert scheme_weights(1, scheme).tolist() == [1.0]


@given(n=st.integers(min_value=3, max_value=500))
def test_wsm_shapes_weight_the_oldest_or_the_middle_most(n):
    sqrt = scheme_weights(n, "wsm-1-sqrt")
    assert sqrt.argmax() == 0 and (np.diff(sqrt) <= 1e-15).all()  # the oldest most
    cosine = scheme_weights(n, "wsm-cosine")
    assert 0 < cosine.argmax() < n - 1  # a peak inside the window
    assert cosine == pytest.approx(cosine[::-1], abs=1e-12)  # symmetric about the middle
