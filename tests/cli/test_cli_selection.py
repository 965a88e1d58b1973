"""`wavg combine` choosing from the training record and writing several windows in one pass,
on files a real Keras run wrote: each window's output equals its separate run bit for bit,
the inputs are read once, and every refusal is one line naming the file."""

from __future__ import annotations

import json

import pytest
from support.kerasfiles import assert_one_line_error, run_wavg
from support.logged_run import logged_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return logged_run(tmp_path_factory.mktemp("logged"))


def combine_json(*args: object) -> dict:
    code, out, err = run_wavg("combine", "--json", *args)
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize(
    ("template", "option", "counts", "extra"),
    [
        ("unlabelled", "--last", [3, 5, 8], []),
        ("unlabelled", "--best", [1, 3, 5], ["--by", "val_loss"]),
        ("unlabelled", "--best", [2, 4], ["--by", "val_accuracy", "--scheme", "wsm-cosine"]),
        ("keras", "--last", [2, 4], ["--scheme", "linear", "--every", "2"]),
        ("keras", "--best", [1, 3], ["--by", "val_loss", "--scheme", "wsm-1-sqrt"]),
    ],
)
def test_each_window_equals_its_separate_run_bit_for_bit(
    run, tmp_path, template, option, counts, extra
):
    files = run.files(template)
    suffix = files[0].name[files[0].name.rindex(".") :]
    listed = ",".join(map(str, counts))
    together = combine_json(*files, option, listed, *extra, "-o", tmp_path / f"avg_n{{n}}{suffix}")
    assert [w["output"] for w in together["windows"]] == [
        str(tmp_path / f"avg_n{n}{suffix}") for n in counts
    ]
    separate_read = 0
    for n, window in zip(counts, together["windows"], strict=True):
        alone = combine_json(*files, option, n, *extra, "-o", tmp_path / f"alone{n}{suffix}")
        both = (tmp_path / f"avg_n{n}{suffix}", tmp_path / f"alone{n}{suffix}")
        assert both[0].read_bytes() == both[1].read_bytes()
        assert window["inputs"] == alone["inputs"]
        assert window["bytes_written"] == alone["bytes_written"]
        separate_read += alone["bytes_read"]
    # One pass reads each input it needs once: a whole window's worth per distinct input.
    needed = {i["path"] for w in together["windows"] for i in w["inputs"]}
    per_input = alone["bytes_read"] // len(alone["inputs"])
    assert together["bytes_read"] == per_input * len(needed) < separate_read


def test_the_plan_table_and_json_show_each_inputs_value(run, tmp_path):
    files = run.files("labelled")
    code, out, err = run_wavg(
        "combine", "--best", "2", "--by", "val_accuracy", *files, "-o", tmp_path / "a.h5"
    )
    assert code == 0, err
    header = err.splitlines()[1].split()
    assert header == ["#", "checkpoint", "epoch", "val_accuracy", "weight"]
    data = combine_json(*files, "--best", "2", "--by", "val_accuracy", "-o", tmp_path / "b.h5")
    assert data["metric"] == "val_accuracy"
    for entry in data["inputs"]:
        assert f"val_accuracy={entry['value']:.4f}" in entry["path"]


def test_several_windows_need_n_in_the_output_name(run, tmp_path):
    code, _, err = run_wavg(
        "combine", *run.files("plain"), "--last", "2,3", "-o", tmp_path / "a.h5"
    )
    assert_one_line_error(code, err, "{n}", exit_code=2)
    assert not (tmp_path / "a.h5").exists()


@pytest.mark.parametrize(
    ("args", "fragments", "exit_code"),
    [
        (["--best", "2", "--by", "val_loss"], ["model.01.h5", "no val_loss value"], 1),
        (["--best", "2"], ["--best needs --by"], 2),
        (["--last", "2,x"], ["--last"], 2),
        (["--best", "9", "--by", "val_loss", "--metrics", "CSV"], ["--best 9 asks for more"], 2),
        (["--every", "0"], ["--every"], 2),
        (["--last", "2,3", "--weights", "1,2"], ["--weights"], 2),
    ],
)
def test_selection_refusals_are_one_line(run, tmp_path, args, fragments, exit_code):
    args = [str(run.csv) if a == "CSV" else a for a in args]
    out = tmp_path / "o{n}.h5"
    code, _, err = run_wavg("combine", *run.files("plain"), *args, "-o", out)
    assert_one_line_error(code, err, *fragments, exit_code=exit_code)
    assert list(tmp_path.iterdir()) == []


def test_a_nan_row_names_the_checkpoint_and_writes_nothing(run, tmp_path):
    lines = run.csv.read_text().splitlines()
    cells = lines[2].split(",")  # epoch 1: the file of epoch 2
    cells[-1] = "nan"
    lines[2] = ",".join(cells)
    broken = tmp_path / "log.csv"
    broken.write_text("\n".join(lines) + "\n")
    files = run.files("plain")
    code, _, err = run_wavg(
        "combine", *files, "--best", "2", "--by", "val_loss", "--metrics", broken,
        "-o", tmp_path / "out.h5",
    )  # fmt: skip
    assert_one_line_error(code, err, str(files[1]), "NaN")
    assert not (tmp_path / "out.h5").exists()


def test_a_failure_in_one_window_leaves_every_output_as_it_was(run, tmp_path):
    import h5py
    import numpy as np

    files = [tmp_path / f.name for f in run.files("plain")]
    for source, copy in zip(run.files("plain"), files, strict=True):
        copy.write_bytes(source.read_bytes())
    with h5py.File(files[0], "r+") as h5:  # NaN in the oldest: only the widest window holds it
        kernels: list[h5py.Dataset] = []
        h5["model_weights"].visititems(
            lambda _, o: kernels.append(o) if isinstance(o, h5py.Dataset) else None
        )
        kernels[0][(0,) * kernels[0].ndim] = np.nan
    old = tmp_path / "out" / "avg_n2.h5"
    old.parent.mkdir()
    old.write_bytes(b"previous")
    code, _, err = run_wavg("combine", *files, "--last", "2,8", "-o", old.parent / "avg_n{n}.h5")
    last = err.strip().splitlines()[-1]  # after the plan tables, printed before averaging
    assert code == 1 and last.startswith("wavg: error: ") and str(files[0]) in last, err
    assert "NaN" in last and "Traceback" not in err
    assert sorted(p.name for p in old.parent.iterdir()) == ["avg_n2.h5"]
    assert old.read_bytes() == b"previous"
