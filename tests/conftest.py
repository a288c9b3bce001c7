import pytest

from wf import TINY, snakemake, workdir


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One real run: demo -> nnU-Net plan/preprocess -> one tiny teacher fold -> manifest -> soft-label cache."""
    wd = workdir(tmp_path_factory.mktemp("trained"), TINY)
    snakemake(wd, "--cores", "2", "softlabels")
    return wd
