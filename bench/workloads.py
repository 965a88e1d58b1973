"""What the benchmark runs: the models, the checkpoint sets and the cells of the table.

A *model* fixes the tensors; a *dataset* is a directory of checkpoints of one model, saved
in one or more formats (checkpoint i has the same weights in every format, so formats can
be compared on identical tensors); a *cell* is one row group of the table: N checkpoints of
one dataset in one format, run through a set of tools. Cells run in the order listed, so
the biggest ones come last and a run cut short still has everything before them.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024
FORMATS = ("h5", "keras", "weights")
SUFFIXES = {"h5": ".h5", "keras": ".keras", "weights": ".weights.h5"}
ALL_TOOLS = ("wavg", "tutorial", "inmemory", "dd")


def checkpoint_name(index: int, fmt: str) -> str:
    """File name of checkpoint `index`: the epoch number in it gives wavg's natural order."""
    return f"ckpt_e{index:04d}{SUFFIXES[fmt]}"


@dataclass(frozen=True)
class Model:
    """An MLP: Input(input_dim), then one Dense per entry of `units` (each + BN if asked);
    or, when `application` names one, that ``keras.applications`` model (``weights=None``,
    nothing downloaded), whose float32 weight count is `params`."""

    name: str
    input_dim: int
    units: tuple[int, ...]
    batchnorm: bool = False
    application: str = ""
    params: int = 0

    @property
    def n_tensors(self) -> int:
        """Stored tensors per checkpoint: kernel and bias, plus four for a BatchNormalization."""
        return len(self.units) * (6 if self.batchnorm else 2)

    @property
    def weight_bytes(self) -> int:
        """Bytes of float32 weights in one checkpoint (the file adds a little metadata)."""
        if self.application:
            return 4 * self.params
        total, fan_in = 0, self.input_dim
        for width in self.units:
            total += (fan_in + 1) * width + (4 * width if self.batchnorm else 0)
            fan_in = width
        return 4 * total


@dataclass(frozen=True)
class Dataset:
    """Checkpoints of one model; `grow` datasets are written only as far as the next cell needs.

    Growing matters for the 1 GB model: its 8 files serve two cells before the other 24 are
    written for the last cell, so a run cut short by time or disk still has the small cells.
    """

    name: str
    model: Model
    seed: int
    grow: bool = False


@dataclass(frozen=True)
class Cell:
    """N checkpoints of one dataset in one format, measured with each of `tools`."""

    name: str
    groups: tuple[str, ...]
    dataset: Dataset
    n: int
    fmt: str
    tools: tuple[str, ...] = ALL_TOOLS
    nofile_limit: int | None = None  # RLIMIT_NOFILE for wavg: proves it does not hold N open

    def matches(self, selectors: list[str]) -> bool:
        """True when `selectors` is empty or names this cell or one of its groups."""
        return not selectors or any(s == self.name or s in self.groups for s in selectors)


# Dense(4096) layers: 64 MiB of kernel each; the 10 MB model is one Dense(4096) on 608 inputs.
TINY = Model("tiny", input_dim=8, units=(16, 4))
SMALL = Model("mlp-10MB", input_dim=608, units=(4096,))
MEDIUM = Model("mlp-270MB", input_dim=4096, units=(4096,) * 4)
LARGE = Model("mlp-1GB", input_dim=4096, units=(4096,) * 16)
# 100 x (Dense + BatchNormalization) = 200 layers, 600 tensors of 1 KiB to 256 KiB.
MANY = Model("many-200layers", input_dim=256, units=(256,) * 100, batchnorm=True)
MANY_QUICK = Model("many-200layers-q", input_dim=64, units=(64,) * 100, batchnorm=True)

# Real architectures: mostly small tensors (BatchNorm vectors, depthwise kernels, biases).
RESNET50 = Model("resnet50", 0, (), application="ResNet50", params=25_636_712)
EFFICIENTNETB0 = Model("efficientnetb0", 0, (), application="EfficientNetB0", params=5_330_571)
MOBILENETV2 = Model("mobilenetv2", 0, (), application="MobileNetV2", params=3_538_984)

D_TINY = Dataset("tiny", TINY, seed=1000)
D_SMALL = Dataset("mlp-10MB", SMALL, seed=2000)
D_MEDIUM = Dataset("mlp-270MB", MEDIUM, seed=3000)
D_LARGE = Dataset("mlp-1GB", LARGE, seed=4000, grow=True)
D_MANY = Dataset("many-200layers", MANY, seed=5000)
D_MANY_QUICK = Dataset("many-200layers-q", MANY_QUICK, seed=6000)
D_APPS = tuple(
    Dataset(model.name, model, seed=7000 + 100 * i)
    for i, model in enumerate((RESNET50, EFFICIENTNETB0, MOBILENETV2))
)

# Only wavg and the dd floor: a tutorial script on a 1000-file set only measures TF start-up.
WAVG_AND_DD = ("wavg", "dd")


def _sample_and_fds(n_fds: int) -> list[Cell]:
    """Start-up bound cells. The fd cells run wavg under a lowered open-files limit: 1024 is
    the usual Linux default (this machine allows 20000, which would hide the problem), and
    256 shows whether wavg needs one descriptor per input at all."""
    return [
        Cell("sample", ("sample",), D_TINY, 10, "h5", WAVG_AND_DD),
        *[
            Cell(f"fds-{n_fds}-ulimit{lim}", ("fds",), D_TINY, n_fds, "h5", WAVG_AND_DD, lim)
            for lim in (1024, 256)
        ],
    ]


def _scale(dataset: Dataset, ns: tuple[int, ...], tools: tuple[str, ...] = ALL_TOOLS) -> list[Cell]:
    groups = ("scale",)
    return [
        Cell(
            f"{dataset.name}-x{n}-h5",
            groups + (("ref",) if dataset is D_MEDIUM and n == 8 else ()),
            dataset,
            n,
            "h5",
            tools,
        )
        for n in ns
    ]


def _formats(dataset: Dataset, n: int) -> list[Cell]:
    """Same tensors as the .h5 cell: the tutorial cannot load .weights.h5 (no architecture),
    and the in-memory h5py script does not unpack .keras zips, so those pairs are left out."""
    return [
        Cell(
            f"{dataset.name}-x{n}-keras",
            ("formats",),
            dataset,
            n,
            "keras",
            ("wavg", "tutorial", "dd"),
        ),
        Cell(
            f"{dataset.name}-x{n}-weights",
            ("formats",),
            dataset,
            n,
            "weights",
            ("wavg", "inmemory", "dd"),
        ),
    ]


def _applications() -> list[Cell]:
    """keras.applications models, 8 checkpoints each, as .h5 and .keras: real models are
    hundreds of small tensors, where per-tensor overhead (not bandwidth) sets the time."""
    return [
        Cell(f"{d.name}-x8-{fmt}", ("apps",), d, 8, fmt, WAVG_AND_DD)
        for d in D_APPS
        for fmt in ("h5", "keras")
    ]


def full_cells() -> list[Cell]:
    """The full matrix (about 45 GB of checkpoints in all, at most ~33 GB on disk at once)."""
    return [
        *_sample_and_fds(1000),
        Cell("many-200layers-x8-h5", ("many",), D_MANY, 8, "h5"),
        *_applications(),
        *_scale(D_SMALL, (2, 8, 32)),
        *_formats(D_SMALL, 8),
        *_scale(D_MEDIUM, (2, 8, 32)),
        *_formats(D_MEDIUM, 8),
        *_scale(D_LARGE, (2, 8, 32)),
    ]


def quick_cells() -> list[Cell]:
    """Small sizes only, for a run under a minute: no tutorial baseline (TensorFlow's start-up
    alone is 5 s a run); the in-memory h5py script is the baseline."""
    no_tf = ("wavg", "inmemory", "dd")
    return [
        *_sample_and_fds(1000),
        Cell("many-200layers-q-x8-h5", ("many",), D_MANY_QUICK, 8, "h5", no_tf),
        *_scale(D_SMALL, (2, 8), no_tf),
        *[Cell(c.name, c.groups, c.dataset, c.n, c.fmt, WAVG_AND_DD) for c in _formats(D_SMALL, 8)],
    ]
