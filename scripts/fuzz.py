"""Mutation fuzzer for wavg's readers and ``wavg.combine``.

Takes valid checkpoints (legacy ``.h5``, ``.keras``, ``.weights.h5``), damages one of two
inputs (flipped, overwritten, inserted or deleted bytes, truncation, edited HDF5 attributes
and datasets, inside the archive or inside its model.weights.h5) and averages the pair. The
only allowed outcomes:

- ``ok``: success, with an output whose averaged tensors equal the average computed
  independently with plain h5py from the (damaged) inputs (``ok-unverified`` when h5py itself
  cannot read a damaged input: the output must still be a readable checkpoint);
- ``refused:<Error>``: a `WavgError` with a one-line message, no output, no temporary file.

Anything else is a bug: another exception, a multi-line message, an output or temporary file
left behind by a failure, a modified input, wrong values, a hang or a crash. Each case runs
in a worker subprocess (``--jobs`` of them), so a crash in libhdf5 or a hang is counted and
reported, not fatal.

Usage::

    .venv/bin/python scripts/fuzz.py --cases 20000 [--jobs 2] [--seed 1] [--timeout 30]
    .venv/bin/python scripts/fuzz.py --replay SEED:INDEX   # rerun one case, in this process

``tests/formats/test_fuzz.py`` runs the same mutations with hypothesis (a short run in make test).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import io
import json
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTIMIZER_GROUPS = ("optimizer_weights", "optimizer")
SEED_KINDS = ("h5", "keras", "weights")
SUFFIX = {"h5": ".h5", "keras": ".keras", "weights": ".weights.h5"}
BYTE_OPS = ("flip", "set", "overwrite", "insert", "delete", "truncate", "interesting")
H5_OPS = (
    "attr_delete",
    "attr_garbage",
    "attr_huge",
    "attr_array",
    "dset_delete",
    "dset_reshape",
    "dset_retype",
    "dset_chunk",
    "dset_scalar",
    "dset_string",
    "group_add",
)
INTERESTING = [b"\xff" * 8, b"\x00" * 8, b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", b"\x01"]


# ---------------------------------------------------------------------------------------------
# seed corpus


def make_seeds(directory: Path, keras_dir: Path | None = None, h5_dir: Path | None = None) -> Path:
    """Two consecutive checkpoints per format in `directory`.

    `keras_dir` holds fixtures made by ``tests/support/safety.py`` (made here, with Keras in
    a subprocess, when not given); `h5_dir` holds model_498.h5 and model_499.h5 (default
    sample_checkpoints).
    """
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "seeds.json"
    if marker.exists():
        return directory
    if keras_dir is None:
        keras_dir = directory / "keras_fixtures"
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "support" / "safety.py"), str(keras_dir)],
            capture_output=True,
            text=True,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
            check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"could not make seed checkpoints:\n{proc.stderr[-2000:]}")
    h5_dir = h5_dir or ROOT / "sample_checkpoints"
    layout = {
        "h5": [h5_dir / f"model_{i}.h5" for i in (498, 499)],
        "keras": [keras_dir / "keras" / f"model_{i}.keras" for i in (2, 3)],
        "weights": [keras_dir / "weights" / f"model_{i}.weights.h5" for i in (2, 3)],
    }
    for kind, paths in layout.items():
        for i, path in enumerate(paths):
            shutil.copy(path, directory / f"{kind}_{i}{SUFFIX[kind]}")
    marker.write_text(json.dumps({k: [f"{k}_{i}{SUFFIX[k]}" for i in (0, 1)] for k in layout}))
    return directory


# ---------------------------------------------------------------------------------------------
# mutations: a case is plain JSON, drawn by random here or by hypothesis in the tests


def random_case(rng: random.Random, sizes: dict[str, int]) -> dict:
    kind = rng.choice(SEED_KINDS)
    layer = rng.choice(("outer", "inner")) if kind == "keras" else "outer"
    size = sizes[f"{kind}/{layer}"]
    ops: list[list] = []
    for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
        if rng.random() < 0.3:
            ops.append([rng.choice(H5_OPS), rng.randrange(1 << 16), rng.randrange(1 << 16)])
            continue
        op = rng.choice(BYTE_OPS)
        # Half the offsets in the first 4 KB, where HDF5 and zip keep most of their metadata.
        offset = rng.randrange(min(size, 4096)) if rng.random() < 0.5 else rng.randrange(size)
        if op == "flip":
            ops.append([op, offset, 1 << rng.randrange(8)])
        elif op == "set":
            ops.append([op, offset, rng.randrange(256)])
        elif op == "overwrite" or op == "insert":
            ops.append([op, offset, rng.randbytes(rng.randrange(1, 64)).hex()])
        elif op == "delete":
            ops.append([op, offset, rng.randrange(1, 256)])
        elif op == "truncate":
            ops.append([op, offset, 0])
        else:
            ops.append([op, offset, rng.randrange(len(INTERESTING))])
    return {
        "kind": kind,
        "deflate": kind == "keras" and rng.random() < 0.3,
        "layer": layer,
        "target": rng.choice(("newest", "older")),
        "ops": ops,
        "allow_nonfinite": rng.random() < 0.2,
    }


def apply_bytes(data: bytes, ops: list[list]) -> bytes:
    buf = bytearray(data)
    for op, offset, arg in ops:
        if op not in BYTE_OPS or not buf:
            continue
        offset %= len(buf)
        if op == "flip":
            buf[offset] ^= arg & 0xFF or 1
        elif op == "set":
            buf[offset] = arg & 0xFF
        elif op == "overwrite":
            chunk = bytes.fromhex(arg)
            buf[offset : offset + len(chunk)] = chunk
        elif op == "insert":
            buf[offset:offset] = bytes.fromhex(arg)
        elif op == "delete":
            del buf[offset : offset + arg]
        elif op == "truncate":
            del buf[offset:]
        elif op == "interesting":
            chunk = INTERESTING[arg % len(INTERESTING)]
            buf[offset : offset + len(chunk)] = chunk
    return bytes(buf)


def apply_h5(path: Path, ops: list[list]) -> None:
    """Edit attributes and datasets of a (still valid) HDF5 file in place with h5py."""
    import h5py
    import numpy as np

    wanted = [op for op in ops if op[0] in H5_OPS]
    if not wanted:
        return
    with h5py.File(path, "r+") as h5:
        for op, a, b in wanted:
            objects: list[str] = ["/"]
            h5.visit(objects.append)
            name = objects[a % len(objects)]
            obj = h5[name]
            with contextlib.suppress(Exception):  # an edit h5py refuses is no case
                if op.startswith("attr_"):
                    keys = list(obj.attrs)
                    key = keys[b % len(keys)] if keys else "fuzz"
                    if op == "attr_delete" and keys:
                        del obj.attrs[key]
                    elif op == "attr_garbage":
                        obj.attrs[key] = random.Random(b).randbytes(b % 300)
                    elif op == "attr_huge":
                        obj.attrs[key] = np.int64(1 << 62) if b % 2 else "x" * (b * 8)
                    elif op == "attr_array":
                        obj.attrs[key] = np.arange(b % 50, dtype="f8")
                elif op == "group_add":
                    group = obj if isinstance(obj, h5py.Group) else obj.parent
                    group.create_group(f"fuzz{b}").create_dataset("x", data=np.ones(b % 7, "f4"))
                elif isinstance(obj, h5py.Dataset):
                    parent, key = obj.parent, name.rsplit("/", 1)[-1]
                    data = obj[()]
                    attrs = dict(obj.attrs)
                    if op == "dset_delete":
                        del parent[key]
                        continue
                    del parent[key]
                    if op == "dset_reshape":
                        flat = np.ravel(data)
                        new = parent.create_dataset(key, data=np.resize(flat, (b % 5 + 1, 3)))
                    elif op == "dset_retype":
                        dtype = ["f2", "f8", "i4", "V2", "u1"][b % 5]
                        new = parent.create_dataset(
                            key,
                            data=np.asarray(data).astype("f4").view("u1").view(dtype)
                            if dtype == "V2"
                            else np.asarray(data).astype(dtype),
                        )
                    elif op == "dset_chunk":
                        new = parent.create_dataset(
                            key,
                            data=data,
                            chunks=True if np.ndim(data) else None,
                            compression="gzip" if b % 2 else None,
                            shuffle=bool(b % 3 == 0),
                        )
                    elif op == "dset_scalar":
                        new = parent.create_dataset(key, data=np.float32(b))
                    else:
                        new = parent.create_dataset(key, data="not a tensor")
                    for k, v in attrs.items():
                        new.attrs[k] = v


def zip_members(path: Path) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(path) as archive:
        return [(info, archive.read(info)) for info in archive.infolist()]


def build_case(case: dict, seeds: Path, work: Path) -> tuple[list[Path], Path]:
    """Write the case's two inputs into `work`; returns (inputs oldest first, damaged one)."""
    names = json.loads((seeds / "seeds.json").read_text())[case["kind"]]
    suffix = SUFFIX[case["kind"]]
    inputs = [work / f"model_1{suffix}", work / f"model_2{suffix}"]
    for name, path in zip(names, inputs, strict=True):
        shutil.copy(seeds / name, path)
    bad = inputs[1] if case["target"] == "newest" else inputs[0]
    h5_ops = [op for op in case["ops"] if op[0] in H5_OPS]
    byte_ops = [op for op in case["ops"] if op[0] in BYTE_OPS]
    if case["kind"] == "keras" and case.get("deflate"):  # as if re-zipped by hand
        members = zip_members(bad)
        with zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as archive:
            for info, content in members:
                archive.writestr(info.filename, content)
    if case["kind"] == "keras" and (case["layer"] == "inner" or h5_ops):
        members = zip_members(bad)
        inner = work / "inner.h5"
        with zipfile.ZipFile(bad) as archive:
            inner.write_bytes(archive.read("model.weights.h5"))
        apply_h5(inner, h5_ops)
        data = inner.read_bytes()
        if case["layer"] == "inner":
            data = apply_bytes(data, byte_ops)
        inner.unlink()
        with zipfile.ZipFile(bad, "w") as archive:
            for info, content in members:
                archive.writestr(info, data if info.filename == "model.weights.h5" else content)
        if case["layer"] == "outer":
            bad.write_bytes(apply_bytes(bad.read_bytes(), byte_ops))
    else:
        apply_h5(bad, h5_ops)
        bad.write_bytes(apply_bytes(bad.read_bytes(), byte_ops))
    return inputs, bad


# ---------------------------------------------------------------------------------------------
# one case, judged


def _stored_weights(path: Path) -> bytes:
    """model.weights.h5 of an archive, by its local header (no CRC check, as wavg reads it)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("model.weights.h5")
        if info.compress_type != zipfile.ZIP_STORED:
            return archive.read(info)
    raw = path.read_bytes()
    header = info.header_offset
    name_len, extra_len = struct.unpack("<HH", raw[header + 26 : header + 30])
    start = header + 30 + name_len + extra_len
    return raw[start : start + info.file_size]


def oracle(path: Path) -> dict:
    """Float model tensors of a checkpoint, read plainly with h5py (and zipfile)."""
    import h5py
    import numpy as np

    source = io.BytesIO(_stored_weights(path)) if zipfile.is_zipfile(path) else path
    tensors = {}
    with h5py.File(source, "r") as h5:

        def visit(name, obj):
            if name.split("/", 1)[0] in OPTIMIZER_GROUPS or not isinstance(obj, h5py.Dataset):
                return
            dtype = obj.dtype
            if dtype.kind == "f" and dtype.itemsize in (2, 4, 8):
                tensors[name] = np.asarray(obj[()])
            elif dtype.kind == "V" and dtype.itemsize == 2 and dtype.fields is None:
                import ml_dtypes

                marker = obj.attrs.get("dtype")
                if marker is None or (
                    (marker.decode() if isinstance(marker, bytes) else str(marker)) == "bfloat16"
                ):
                    tensors[name] = np.asarray(obj[()]).view(ml_dtypes.bfloat16)

        h5.visititems(visit)
    return tensors


def check_success(out: Path, inputs: list[Path]) -> str:
    """'' when `out` holds the right average; else what is wrong ('?' when unverifiable)."""
    import numpy as np

    # The inputs first: the output carries the newest input's metadata as it is, so an
    # attribute h5py cannot read there is as unreadable in the output (unverifiable, no bug).
    try:
        loaded = [oracle(p) for p in inputs]
    except Exception:  # noqa: BLE001 - h5py cannot read a damaged input: unverifiable
        return "?"
    try:
        got = oracle(out)
    except Exception as exc:  # noqa: BLE001
        return f"output unreadable: {type(exc).__name__}: {exc}"[:300]
    want = loaded[-1]
    if set(got) != set(want):
        missing = sorted(set(want) ^ set(got))[:3]
        return f"output tensors differ from the newest input's: {missing}"
    for name, ref in want.items():
        if any(name not in t or t[name].shape != ref.shape for t in loaded):
            return "?"  # wavg would have refused: h5py sees the files differently
        acc = sum(t[name].astype(np.float64) for t in loaded) / len(loaded)
        low = ref.dtype.itemsize == 2
        try:
            np.testing.assert_allclose(
                got[name].astype(np.float64),
                acc.astype(ref.dtype).astype(np.float64),
                rtol=1e-2 if low else 1e-6,
                atol=0,
                equal_nan=True,
            )
        except AssertionError:
            return f"wrong average in {name}"
    return ""


def digest(paths: list[Path]) -> list[tuple[str, int]]:
    return [(hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in paths]


def run_case(case: dict, seeds: Path, work: Path) -> dict:
    """Build, run and judge one case in `work` (emptied first). Never raises."""
    import wavg
    from wavg.errors import WavgError
    from wavg.formats.registry import open_checkpoint

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        inputs, bad = build_case(case, seeds, work)
    except Exception as exc:  # noqa: BLE001 - a mutation that cannot be built is no case
        return {"outcome": "skipped", "detail": f"{type(exc).__name__}: {exc}"[:200]}
    out = work / f"avg{SUFFIX[case['kind']]}"
    before = digest(inputs)
    outcome, detail = "ok", ""
    try:
        for path in inputs:  # the readers alone
            open_checkpoint(str(path)).close()
        wavg.combine(inputs, out, order="given", allow_nonfinite=case["allow_nonfinite"])
    except WavgError as exc:
        message = str(exc)
        outcome = f"refused:{type(exc).__name__}"
        if not message.strip() or "\n" in message:
            outcome, detail = "bug:bad-message", repr(message)[:300]
        elif out.exists():
            outcome, detail = "bug:output-after-failure", message
        else:
            detail = message[:300]
    except Exception as exc:  # noqa: BLE001 - the bug this fuzzer looks for
        outcome, detail = f"bug:{type(exc).__name__}", " ".join(str(exc).split())[:300]
    else:
        problem = check_success(out, inputs)
        if problem == "?":
            outcome = "ok-unverified"
        elif problem:
            outcome, detail = "bug:wrong-output", problem
    left = sorted(p.name for p in work.iterdir() if ".wavg-tmp-" in p.name)
    if left and not outcome.startswith("bug"):
        outcome, detail = "bug:temp-left", str(left)
    if digest(inputs) != before and not outcome.startswith("bug"):
        outcome, detail = "bug:input-modified", str(bad)
    return {"outcome": outcome, "detail": detail}


# ---------------------------------------------------------------------------------------------
# workers and the driver


def worker(seeds: Path, work: Path) -> None:
    """Read one case per stdin line, answer one JSON line per case on stdout."""
    for line in sys.stdin:
        case = json.loads(line)
        result = run_case(case, seeds, work)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


class Worker:
    def __init__(self, seeds: Path, work: Path) -> None:
        self.work = work
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", "--seeds", str(seeds), "--work", str(work)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()  # type: ignore[union-attr]
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def seed_sizes(seeds: Path) -> dict[str, int]:
    names = json.loads((seeds / "seeds.json").read_text())
    sizes = {}
    for kind in SEED_KINDS:
        path = seeds / names[kind][1]
        sizes[f"{kind}/outer"] = path.stat().st_size
        if kind == "keras":
            with zipfile.ZipFile(path) as archive:
                sizes[f"{kind}/inner"] = archive.getinfo("model.weights.h5").file_size
    return sizes


def drive(cases: int, jobs: int, seed: int, timeout: float, seeds: Path, root: Path) -> int:
    sizes = seed_sizes(seeds)
    workers: list[Worker | None] = [None] * jobs
    counts: collections.Counter[str] = collections.Counter()
    bugs: list[tuple[str, dict, dict]] = []
    started = time.monotonic()
    next_case = 0
    pending: dict[int, tuple[str, dict, float]] = {}  # worker slot -> (id, case, start)
    report_at = 1000
    # Simple round-robin: each worker gets one case at a time; select over the busy ones.
    while next_case < cases or pending:
        for slot in range(jobs):
            if slot in pending or next_case >= cases:
                continue
            if workers[slot] is None or not workers[slot].alive:
                workers[slot] = Worker(seeds, root / f"w{slot}")
            case_id = f"{seed}:{next_case}"
            case = random_case(random.Random(case_id), sizes)
            pending[slot] = (case_id, case, time.monotonic())
            w = workers[slot]
            assert w is not None and w.proc.stdin is not None
            w.proc.stdin.write(json.dumps(case) + "\n")
            w.proc.stdin.flush()
            next_case += 1
        streams = {workers[s].proc.stdout: s for s in pending}  # type: ignore[union-attr]
        ready, _, _ = select.select(list(streams), [], [], 0.5)
        now = time.monotonic()
        finished = []
        for stream in ready:
            slot = streams[stream]
            line = stream.readline()
            if line:
                finished.append((slot, json.loads(line)))
            else:
                code = workers[slot].proc.wait()  # type: ignore[union-attr]
                finished.append((slot, {"outcome": f"crash:{code}", "detail": "worker died"}))
                workers[slot] = None
        for slot, (_, _, since) in list(pending.items()):
            if now - since > timeout and all(s != slot for s, _ in finished):
                workers[slot].proc.kill()  # type: ignore[union-attr]
                workers[slot].proc.wait()  # type: ignore[union-attr]
                workers[slot] = None
                finished.append((slot, {"outcome": "hang", "detail": f"over {timeout} s"}))
        for slot, result in finished:
            case_id, case, _ = pending.pop(slot)
            counts[result["outcome"]] += 1
            if result["outcome"].startswith(("bug", "hang", "crash")):
                bugs.append((case_id, case, result))
                print(f"BUG {case_id}: {result['outcome']}: {result['detail']}", flush=True)
        if sum(counts.values()) >= report_at:
            print(f"... {report_at} cases, {time.monotonic() - started:.0f} s", flush=True)
            report_at += 1000
    for w in workers:
        if w is not None:
            w.close()
    seconds = time.monotonic() - started
    tried = sum(counts.values())
    print(f"cases tried: {tried} in {seconds:.0f} s ({tried / max(seconds, 1e-9):.0f}/s)")
    for outcome, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {outcome:32s} {n}")
    if bugs:
        print(f"{len(bugs)} failing cases; replay one with --replay SEED:INDEX")
        for case_id, case, result in bugs[:20]:
            print(f"  {case_id} {result['outcome']} {json.dumps(case)[:300]}")
    return 1 if bugs else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000, help="cases to run (default 2000)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the run")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per case")
    parser.add_argument("--replay", metavar="SEED:INDEX", help="run one case here and print it")
    parser.add_argument("--case", metavar="JSON", help="run this case (as printed) here")
    parser.add_argument("--seeds", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.seeds, args.work)
        return 0
    with tempfile.TemporaryDirectory(prefix="wavg-fuzz-") as tmp:
        root = Path(tmp)
        seeds = make_seeds(Path(args.seeds) if args.seeds else root / "seeds")
        if args.replay or args.case:
            if args.case:
                case = json.loads(args.case)
            else:
                case = random_case(random.Random(args.replay), seed_sizes(seeds))
            print(json.dumps(case))
            print(json.dumps(run_case(case, seeds, root / "replay")))
            return 0
        return drive(args.cases, args.jobs, args.seed, args.timeout, seeds, root)


if __name__ == "__main__":
    sys.exit(main())
