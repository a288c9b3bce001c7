"""`snakemake --lint` finds nothing in the workflow: run on a copy of it with the default config, as a user
runs it from the repository root (it exits 1 on any finding, e.g. a rule without a log or conda env)."""

import subprocess

from wf import BIN, env, workdir


def test_snakemake_lint_of_a_workflow_copy_finds_nothing(tmp_path):
    wd = workdir(tmp_path)
    run = subprocess.run([str(BIN / "snakemake"), "--lint"], cwd=wd, env=env(), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
