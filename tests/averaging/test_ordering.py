"""Epoch order from file names, and --last / --order given."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavg import order_checkpoints
from wavg.averaging.ordering import epoch_numbers
from wavg.errors import UsageError


def test_natural_sort_puts_epoch_10_after_9():
    got = order_checkpoints(["model_10.h5", "model_9.h5", "model_8.h5"])
    assert got == [Path("model_8.h5"), Path("model_9.h5"), Path("model_10.h5")]


@given(epochs=st.lists(st.integers(0, 10**6), min_size=1, max_size=40, unique=True))
def test_any_shell_order_gives_epoch_order(epochs):
    names = [f"ckpt/model_{e}.weights.h5" for e in epochs]
    random.shuffle(names)
    got = order_checkpoints(names)
    assert epoch_numbers(got) == sorted(epochs)


def test_the_epoch_is_the_number_that_changes_not_the_last_one():
    names = ["model.05-0.43.h5", "model.06-0.41.h5", "model.07-0.52.h5"]
    assert epoch_numbers(order_checkpoints(list(reversed(names)))) == [5, 6, 7]


def test_the_h5_suffix_is_not_an_epoch_number():
    with pytest.raises(UsageError, match="no epoch number"):
        order_checkpoints(["final.h5", "best.h5"])


def test_numbered_directories_order_identical_file_names():
    got = order_checkpoints(["run/10/model.keras", "run/9/model.keras"])
    assert got == [Path("run/9/model.keras"), Path("run/10/model.keras")]


def test_two_files_of_one_epoch_are_refused():
    with pytest.raises(UsageError, match="both look like epoch 5"):
        order_checkpoints(["a/model_5.h5", "b/model_5.h5"])


def test_given_order_is_kept_and_last_is_newest():
    got = order_checkpoints(["b.h5", "a.h5", "c.h5"], order="given")
    assert got == [Path("b.h5"), Path("a.h5"), Path("c.h5")]


def test_last_keeps_the_newest():
    got = order_checkpoints([f"m_{i}.h5" for i in range(12)], last=3)
    assert got == [Path("m_9.h5"), Path("m_10.h5"), Path("m_11.h5")]


@pytest.mark.parametrize("last", [0, -1, 4])
def test_impossible_last_is_refused(last):
    with pytest.raises(UsageError, match="--last"):
        order_checkpoints(["m_1.h5", "m_2.h5", "m_3.h5"], last=last)


def test_unknown_order_and_empty_list_are_refused():
    with pytest.raises(UsageError, match="unknown order"):
        order_checkpoints(["m_1.h5"], order="random")
    with pytest.raises(UsageError, match="no checkpoints"):
        order_checkpoints([])
