"""-q on the Keras-side commands (issue 22): no progress, notes or summary line; the results
asked for (--json, evaluate's table) and errors are still printed. And evaluate's --order.
"""

from __future__ import annotations

import json

import pytest
from support.kerasfiles import assert_one_line_error, run_wavg, short_run

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_quiet_soup_and_bn_update_print_only_what_was_asked(tmp_path):
    run = short_run()
    code, out, err = run_wavg("soup", *run, "--data", "blobs", "-o", tmp_path / "s.h5", "-q")
    assert (code, out, err) == (0, "", "")
    code, out, err = run_wavg(
        "soup", *run, "--data", "blobs", "-o", tmp_path / "s.h5", "-q", "--json"
    )
    assert code == 0 and err == "" and json.loads(out)["schema"] == "wavg.soup/1"
    code, out, err = run_wavg(
        "bn-update", run[-1], "--data", "blobs", "-o", tmp_path / "b.h5", "-q"
    )
    assert (code, out, err) == (0, "", "")  # no BatchNorm in this model: its note is not shown
    code, _, err = run_wavg("bn-update", run[-1], "--data", "blobs", "-o", tmp_path / "b.h5")
    assert err.startswith("wavg: note: ") and "no trainable BatchNormalization" in err


def test_quiet_evaluate_still_prints_its_results_and_its_errors(tmp_path):
    run = short_run()
    code, out, err = run_wavg("evaluate", *run[-2:], "--schemes", "equal", "--csv", "-q")
    assert code == 0 and err == "" and out.startswith("n,")
    code, _, err = run_wavg("evaluate", *run[-2:], "-q", "--data", tmp_path / "none.npz")
    assert_one_line_error(code, err, "none.npz")


def test_evaluate_takes_order_given_like_combine():
    run = short_run()
    flags = ("--schemes", "equal", "--no-ensemble", "--no-greedy", "--json", "-q")
    code, out, err = run_wavg("evaluate", run[-1], run[-2], *flags)
    assert code == 0, err
    code, given, err = run_wavg("evaluate", run[-1], run[-2], "--order", "given", *flags)
    assert code == 0, err
    natural, given = json.loads(out), json.loads(given)
    # newest first: the last listed with --order given, the latest epoch otherwise
    assert given["checkpoints"] == [str(run[-2]), str(run[-1])]
    assert natural["checkpoints"] == [str(run[-1]), str(run[-2])]
