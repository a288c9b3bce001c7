"""Helpers shared by the stages' commands: argument types, config-backed flags, the job's threads, huge pages."""

from __future__ import annotations

import argparse
import os
import sys

from fastkd.config import arg_type, default


def set_threads(threads: int, training: bool = False) -> None:
    """Bound every pool nnU-Net starts by the job's threads (unless the user set them explicitly).

    ``training``: at least one augmentation worker (even over an explicit 0), so augmentation runs beside the network, not in
    turn with it, even in a one-thread job (nnU-Net's planner also needs >= 1: it sizes torch's pool by it).
    """
    da_workers = int(os.environ.setdefault("nnUNet_n_proc_DA", str(max(threads - 1, 0))))
    os.environ["nnUNet_n_proc_DA"] = str(max(da_workers, 1 if training else 0))
    os.environ.setdefault("nnUNet_def_n_proc", str(threads))
    import torch

    torch.set_num_threads(threads)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 1")
    return value


def fold_arg(text: str):
    if text == "all":
        return "all"
    try:
        fold = int(text)
    except ValueError:
        fold = -1
    if fold not in range(5):
        raise argparse.ArgumentTypeError(f"{text!r}: a fold is 0-4 or 'all'")
    return fold


def config_flag(parser, flags: list[str], key: str, help: str, **kwargs) -> None:
    """A flag that sets config key ``key``: its default and its check come from the schema."""
    parser.add_argument(*flags, type=arg_type(key), default=default(key),
                        help=f"{help} (config {key}; default {default(key)})", **kwargs)


def _stage(sub, name: str, help: str):
    parser = sub.add_parser(name, help=help)
    return parser.add_subparsers(dest="action", required=True, metavar="ACTION")


def huge_pages() -> None:
    """Let torch's CPU allocator put its large tensors on transparent huge pages.

    Sets ``THP_MEM_ALLOC_ENABLE=1`` (a value already in the environment wins) while torch is not yet
    loaded: torch reads it once, at its first allocation. On kernels whose THP mode is ``madvise``
    (Debian's and Ubuntu's default) torch otherwise maps and page-faults every large tensor anew
    4 kB at a time; on the 2-core CPU a 119-class teacher's forwards ran 1.2x faster with it (30x fewer
    page faults; benchmarks/README.md). Where THP is ``never``, nothing changes. Child processes
    (nnU-Net's commands, workers) inherit it.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
