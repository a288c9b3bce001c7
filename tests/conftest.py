import pytest
import yaml

from wf import TINY, snakemake, workdir

#: fixtures that run real nnU-Net training through Snakemake (minutes on 2 cores)
TRAINING_FIXTURES = {"trained", "students"}


def pytest_collection_modifyitems(config, items):
    """Every test that trains through Snakemake is marked slow, so `pytest -m "not slow"` takes seconds."""
    unmarked = [item.nodeid for item in items
                if TRAINING_FIXTURES & set(item.fixturenames) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("tests that train through Snakemake must be marked @pytest.mark.slow: "
                                + ", ".join(unmarked))


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One real run: demo -> nnU-Net plan/preprocess -> one tiny teacher fold -> manifest -> soft-label cache."""
    wd = workdir(tmp_path_factory.mktemp("trained"), TINY)
    snakemake(wd, "--cores", "2", "softlabels")
    return wd


@pytest.fixture(scope="session")
def students(trained):
    """``snakemake student`` on the fixture: r = 2, fold 1, distilled + baseline, 2 tiny epochs."""
    config = yaml.safe_load((trained / "test.yaml").read_text())
    config.setdefault("student", {})["folds"] = [1]
    (trained / "test.yaml").write_text(yaml.safe_dump(config))
    run = snakemake(trained, "--cores", "2", "student")
    return trained, run
