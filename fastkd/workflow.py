"""Run fastkd's Snakemake workflow from Python, for commands that are the workflow under other names.

The reference system's commands (:mod:`fastkd.reference_cli`) map their flags onto a fastkd config
and ask for one target; :func:`run_workflow` runs the repository's ``Snakefile`` on it through
Snakemake's Python API, so the stage sequence exists once (the rules) and such commands get what the
workflow has: up-to-date outputs reused, incomplete-output protection, logs and benchmarks.

It writes the config it runs (``config_file``: a workflow config, so ``snakemake --configfile`` reruns
it by hand) and whatever the jobs write; Snakemake keeps its own bookkeeping in ``<workdir>/.snakemake``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import fastkd
from fastkd.errors import FastkdError

SNAKEFILE = Path(fastkd.__file__).resolve().parents[1] / "Snakefile"


@contextmanager
def inside(folder: Path):
    """Run a block with ``folder`` as the current directory: a config's relative paths are relative to
    the workflow's working directory, and :class:`fastkd.paths.Paths` reads plans through them."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def spell(path: str | Path, base: Path) -> str:
    """``path`` as a workflow config in ``base`` spells it: relative to ``base`` if inside it, else absolute."""
    path = Path(os.path.normpath(base / Path(path).expanduser()))
    try:
        return str(path.relative_to(base)) or "."
    except ValueError:
        return str(path)


def run_workflow(config: dict, workdir: Path, config_file: Path, targets: list[str | Path], *,
                 forcerun: tuple[str, ...] = (), cores: int = 1) -> None:
    """Run the workflow in ``workdir`` with ``config`` (written to ``config_file``) up to ``targets``.

    ``forcerun``: rules whose jobs run even when their outputs are up to date. Outputs are reused when
    they are newer than their inputs (Snakemake's mtime trigger only: the artifact names carry the
    settings they depend on, and the workflow and these commands may have written them with configs
    that differ in keys that do not matter to them). Raises FastkdError when a job fails.
    """
    import yaml
    from snakemake.api import SnakemakeApi
    from snakemake.settings.enums import RerunTrigger
    from snakemake.settings.types import (ConfigSettings, DAGSettings, ExecutionSettings, OutputSettings,
                                          ResourceSettings)

    from fastkd.io import atomic_write_text

    if not SNAKEFILE.is_file():
        raise FastkdError(f"the fastkd workflow ({SNAKEFILE}) is not beside the installed package; install fastkd "
                          "from its source folder (pip install -e .), where the Snakefile is")
    config_file = Path(workdir) / config_file
    atomic_write_text(config_file, yaml.safe_dump(config, sort_keys=False))
    try:
        with SnakemakeApi(OutputSettings(printshellcmds=True, show_failed_logs=True)) as api:
            workflow = api.workflow(resource_settings=ResourceSettings(cores=cores),
                                    config_settings=ConfigSettings(configfiles=[config_file]),
                                    snakefile=SNAKEFILE, workdir=Path(workdir))
            dag = workflow.dag(DAGSettings(targets={str(t) for t in targets}, forcerun=set(forcerun),
                                           force_incomplete=True, rerun_triggers={RerunTrigger.MTIME}))
            dag.execute_workflow(executor="local", execution_settings=ExecutionSettings())
    except Exception as e:  # Snakemake has printed the failed job and its log
        raise FastkdError(f"the workflow stopped: {type(e).__name__}: {e} (rerun by hand in {workdir}: snakemake "
                          f"--configfile {config_file} {' '.join(map(str, targets))})") from None
