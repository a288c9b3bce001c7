"""Test tiers and the session's workflow fixtures.

Tiers (``--tier``; docs/testing.md):

- ``default`` (plain ``pytest``): unit tests, and the ``smoke`` tests that run the real pipeline once on the
  session fixtures below (preprocessing, one tiny teacher fold, the soft-label cache, KD and baseline
  students, their ONNX export, one stock prediction). No root, no ``../shared``.
- ``ci``: the default tier plus the ``ci`` tests: the whole demo DAG, reruns, the report, SLURM on a local
  cluster, prediction parity with stock nnU-Net.
- ``extended``: only the ``extended`` tests (minutes each: BraTS and anisotropic parity, a killed SLURM
  controller, teacher resume, teachers trained elsewhere, DA5, the reference CLI's training).
- ``all``: every test.

A test that uses a workflow fixture must carry exactly one tier marker (checked at collection), and a test
that runs Snakemake for real (not a dry run) must carry one too (checked when ``workflow_runs.snakemake`` runs).

The workflow fixtures are built once per session and never changed by a test: each is a copy of the one
before it, and every test that uses one fails if it changed a file in it (tests that change things work on
a ``workflow_runs.clone`` of it). So the order of the tests does not matter.
"""

import os

import pytest
import yaml

import workflow_runs
from workflow_runs import TINY, clone, snakemake, workdir

TIERS = ("smoke", "ci", "extended")
#: which tier markers each ``--tier`` runs (None: the tests without a tier marker, the unit tests)
SELECTED = {"default": {None, "smoke"}, "ci": {None, "smoke", "ci"}, "extended": {"extended"},
            "all": {None, *TIERS}}
#: fixtures that are real workflow runs or built on them (a test also "uses" the fixtures its fixtures use)
WORKFLOW_FIXTURES = {"trained", "students", "exported", "finished", "wf", "demo", "slurm_cluster",
                     "slurm_softlabels"}
#: the fixtures no test may change (checked after every test that uses one)
FROZEN = ("trained", "students", "exported", "finished")


def pytest_addoption(parser):
    parser.addoption("--tier", choices=sorted(SELECTED), default="default",
                     help="default: unit + smoke tests (plain pytest); ci: + end-to-end tests; extended: the "
                          "minutes-long tests only; all: everything")


def tier_of(item) -> str | None:
    marked = [name for name in TIERS if item.get_closest_marker(name) is not None]
    if len(marked) > 1:
        raise pytest.UsageError(f"{item.nodeid}: more than one tier marker ({', '.join(marked)})")
    return marked[0] if marked else None


def pytest_collection_modifyitems(config, items):
    """Tests that use a workflow fixture must carry a tier marker; then keep the ``--tier``'s tests."""
    unmarked = [item.nodeid for item in items if WORKFLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
                and tier_of(item) is None]
    if unmarked:
        raise pytest.UsageError("tests that use a workflow fixture must be marked smoke, ci or extended: "
                                + ", ".join(unmarked))
    wanted = SELECTED[config.getoption("--tier")]
    keep = [item for item in items if tier_of(item) in wanted]
    dropped = [item for item in items if tier_of(item) not in wanted]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_report_header(config):
    tier = config.getoption("--tier")
    kinds = ["unit" if kind is None else kind for kind in (None, *TIERS) if kind in SELECTED[tier]]
    return f"fastkd test tier: {tier} ({' + '.join(kinds)} tests)"


@pytest.fixture(autouse=True)
def _tier_and_frozen_fixtures(request):
    """Tells ``workflow_runs.snakemake`` the running test's tier; fails a test that changed a frozen fixture."""
    workflow_runs.CURRENT_TIER = tier_of(request.node)
    frozen = {name: request.getfixturevalue(name) for name in FROZEN if name in request.fixturenames}
    before = {name: snapshot(path) for name, path in frozen.items()}
    yield
    workflow_runs.CURRENT_TIER = None
    for name, path in frozen.items():
        after = snapshot(path)
        if after != before[name]:
            changed = sorted({*before[name].items() ^ after.items()})
            names = sorted({p for p, _ in changed})
            pytest.fail(f"the test changed the session fixture {name!r} ({path}): {names[:10]}; work on a "
                        f"workflow_runs.clone(...) of it instead")


def snapshot(root) -> dict[str, tuple[int, int]]:
    """(size, modification time) of every file below ``root``, Snakemake's own bookkeeping aside."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in (".snakemake", "__pycache__")]
        for name in files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            found[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return found


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One real run: demo -> nnU-Net plan/preprocess -> one tiny teacher fold -> manifest -> soft-label cache."""
    wd = workdir(tmp_path_factory.mktemp("trained"), {**TINY, "student": {**TINY["student"], "folds": [1]}})
    snakemake(wd, "--cores", "2", "softlabels", tier="smoke")
    return wd


@pytest.fixture(scope="session")
def students(trained, tmp_path_factory):
    """A copy of ``trained`` after ``snakemake student``: r = 2, fold 1, distilled + baseline, 2 tiny epochs."""
    wd = clone(trained, tmp_path_factory.mktemp("students"))
    snakemake(wd, "--cores", "2", "student", tier="smoke")
    return wd


@pytest.fixture(scope="session")
def exported(students, tmp_path_factory):
    """A copy of ``students`` after ``snakemake export``: both students as verified ONNX files."""
    wd = clone(students, tmp_path_factory.mktemp("exported"))
    snakemake(wd, "--cores", "2", "export", tier="smoke")
    return wd


@pytest.fixture(scope="session")
def finished(exported, tmp_path_factory):
    """A copy of ``exported`` run to the end of the DAG: teacher and student predictions of the held-out
    cases, the evaluation and the report's pages (students predicted without test-time mirroring, two
    one-thread prediction jobs side by side)."""
    wd = clone(exported, tmp_path_factory.mktemp("finished"))
    config = yaml.safe_load((wd / "test.yaml").read_text())
    config["evaluation"] = {"mirroring": False}
    config["resources"]["predict"] = {"threads": 1}
    (wd / "test.yaml").write_text(yaml.safe_dump(config))
    snakemake(wd, "--cores", "2", tier="ci")
    assert "Nothing to be done" in snakemake(wd, "-n", "--cores", "2").stdout
    return wd
