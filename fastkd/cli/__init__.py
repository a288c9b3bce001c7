"""The fastkd command: ``fastkd <stage> <action>``, one action per workflow rule, each usable without Snakemake.

Stages follow the workflow: ``demo``, ``config``, ``preprocess``, ``teachers``, ``softlabels``,
``cache`` (inspect a store), ``student``, ``evaluate``, ``export``, ``report``; and ``fastkd predict``. Flags that set a config
value take their default from the config schema and are checked by it, so a value is valid (or not) the same way in ``config.yaml``,
on the command line and in the reference commands. ``fastkd student train`` takes its settings as
config keys (``--set student.schedule.epochs=10``), so a new student option needs no new flag.

nnU-Net reads its folders from the environment (``nnUNet_raw``, ``nnUNet_preprocessed``,
``nnUNet_results``) as nnU-Net's own commands do; the Snakefile sets them from the config for every
job. Heavy imports (torch, nnU-Net) happen inside the actions, so ``fastkd --help`` is instant.

Each stage is one module of this package: its ``add_parser`` adds the stage's actions, beside their
handlers; ``common`` holds what the stages share. This module builds the parser from them and runs an action.
"""

from __future__ import annotations

import argparse
import sys

from fastkd.cli import cache, config, demo, evaluate, export, predict, preprocess, report, softlabels, student, teachers
from fastkd.cli.common import huge_pages
from fastkd.errors import FastkdError

# the stages in the order `fastkd --help` lists them
STAGES = (demo, config, preprocess, teachers, softlabels, cache, student, evaluate, report, export, predict)


def build_parser() -> argparse.ArgumentParser:
    from fastkd import __version__

    parser = argparse.ArgumentParser(prog="fastkd", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"fastkd {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage in STAGES:
        stage.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    huge_pages()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FastkdError as e:
        print(f"fastkd {' '.join(filter(None, [args.stage, args.action]))}: error: {e}", file=sys.stderr)
        return 1
    return 0
