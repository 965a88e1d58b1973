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


@pytest.mark.parametrize(
    "names",
    [["run1/best.h5", "run1/last.h5"], ["mc3/weights.h5", "mc3/weights_final.h5"]],
)
def test_a_folder_every_input_shares_is_never_the_epoch(names):
    with pytest.raises(UsageError, match="no epoch number in the name"):
        order_checkpoints(names)
    assert epoch_numbers(names) == [None, None]


def test_folder_checkpoints_take_the_epoch_from_their_own_folder_name():
    got = order_checkpoints(["run7/ep10/", "run7/ep9/", "run7/ep11"])
    assert got == [Path("run7/ep9"), Path("run7/ep10"), Path("run7/ep11")]
    assert epoch_numbers(got) == [9, 10, 11]


def test_a_single_input_needs_no_epoch_and_takes_none_from_its_folder():
    assert order_checkpoints(["mc3/weights.h5"]) == [Path("mc3/weights.h5")]
    assert epoch_numbers(["mc3/weights.h5"]) == [None]
    assert epoch_numbers(["mc3/model_7.h5"]) == [7]
    assert order_checkpoints(["run3/best.h5"], order="given", last=1) == [Path("run3/best.h5")]


_NAMES = st.sampled_from(["model_{}.h5", "ep{}/model.keras", "{}/ckpt.weights.h5", "m.{}-0.4.h5"])


@given(
    pattern=_NAMES,
    epochs=st.lists(st.integers(0, 10**4), min_size=1, max_size=12, unique=True),
    parents=st.lists(st.from_regex(r"[a-z]{0,3}[0-9]{1,3}", fullmatch=True), max_size=3),
    url=st.booleans(),
)
def test_a_shared_parent_folder_with_digits_never_changes_the_order(pattern, epochs, parents, url):
    names = [pattern.format(e) for e in epochs]
    prefix = "/".join(parents)
    root = f"s3://bucket7/{prefix}" if url else prefix
    moved = [f"{root}/{name}" if root else name for name in names]
    plain = order_checkpoints(names)
    nested = order_checkpoints(moved)
    assert [str(p).removeprefix(root).lstrip("/") for p in nested] == [str(p) for p in plain]
    assert epoch_numbers(nested) == epoch_numbers(plain)
    if len(epochs) > 1:
        assert epoch_numbers(plain) == sorted(epochs)
