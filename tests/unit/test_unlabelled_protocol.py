"""benchmarks/unlabelled_protocol.py: the split it prepares from a labelled dataset, and its decision rule."""

import importlib.util
import json
from pathlib import Path

import pytest

from fastkd.checks import load_config
from fastkd.demo import make_demo_dataset

REPO = Path(__file__).resolve().parents[2]
HIPPOCAMPUS = REPO.parent / "shared" / "datasets" / "Dataset004_Hippocampus"
_spec = importlib.util.spec_from_file_location("unlabelled_protocol", REPO / "benchmarks" / "unlabelled_protocol.py")
protocol = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(protocol)


def test_prepare_splits_the_cases_three_ways_without_labels_for_the_unlabelled(tmp_path):
    source = tmp_path / "Dataset960_Src"
    make_demo_dataset(source, n_cases=10, n_test=0, n_channels=2)
    out = tmp_path / "split"
    summary = protocol.prepare(source, out, n_labelled=4, n_unlabelled=3, n_test=2, seed=1)
    raw = Path(summary["raw"])
    assert raw.parent == out and raw.name.startswith("Dataset104_") and raw.name.endswith("L4")
    assert summary == {"raw": str(raw), "unlabelled_folder": str(out / "unlabelled"), "n_labelled": 4, "n_test": 2,
                       "n_unlabelled": 3}
    split = json.loads((out / "split.json").read_text())
    labelled, test, unlabelled = set(split["labelled"]), set(split["test"]), set(split["unlabelled"])
    assert (len(labelled), len(test), len(unlabelled)) == (4, 2, 3) and not (labelled & test or labelled & unlabelled
                                                                              or test & unlabelled)
    assert {p.name for p in (raw / "labelsTr").iterdir()} == {f"{c}.nii.gz" for c in labelled}
    assert {p.name for p in (raw / "labelsTs").iterdir()} == {f"{c}.nii.gz" for c in test}
    assert {p.name for p in (out / "unlabelled").iterdir()} == {f"{c}_{ch:04d}.nii.gz" for c in unlabelled
                                                                for ch in range(2)}
    assert json.loads((raw / "dataset.json").read_text())["numTraining"] == 4
    for link in (out / "unlabelled").iterdir():  # the source's images, never a copy or a label
        assert link.is_symlink() and link.resolve().parent == (source / "imagesTr").resolve()
    with pytest.raises(SystemExit, match="> the 10 cases"):
        protocol.prepare(source, tmp_path / "too_many", n_labelled=6, n_unlabelled=3, n_test=2, seed=1)


def _group(kind, share, mean, sd, n=3):
    return {"label": f"{kind} {share}", "kind": kind, "unlabelled_share": share, "n": n,
            "dice": {"organ": {"mean": mean, "sd": sd}}, "mean_dice": {"mean": mean, "sd": sd}}


def test_decide_applies_the_rule_stated_before_the_runs(tmp_path):
    groups = [{"label": "teachers", "kind": "teacher ensemble"}, _group("student (KD)", 0.5, 0.84, 0.04),
              _group("student (KD)", 0.0, 0.81, 0.07), _group("no-KD baseline", None, 0.70, 0.05)]
    path = tmp_path / "dice.json"
    path.write_text(json.dumps({"cases": ["a", "b"], "classes": ["organ"], "groups": groups}))
    text = protocol.decide(path)
    assert "A vs B: d = +0.030, s = 0.070 -> no measurable difference" in text
    assert "A vs C: d = +0.140, s = 0.050 -> gain" in text and "B vs C: d = +0.110, s = 0.070 -> gain" in text
    assert protocol.verdict(_group("x", 0, 0.60, 0.02), _group("y", 0, 0.70, 0.05))[2] == "loss"
    path.write_text(json.dumps({"cases": ["a"], "classes": ["organ"], "groups": groups[:2]}))
    with pytest.raises(SystemExit, match="no group for arm"):
        protocol.decide(path)


@pytest.mark.ci
def test_the_hippocampus_config_validates_on_the_split_prepare_makes_from_shared(tmp_path, capsys):
    """configs/unlabelled-hippocampus.yaml as its header says: prepare, then the config from that directory."""
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.fail(f"the Hippocampus dataset is not at {HIPPOCAMPUS} (../shared beside the repository)")
    protocol.main(["prepare", str(HIPPOCAMPUS), str(tmp_path / "hippo-unlabelled")])  # the header's command
    summary = json.loads(capsys.readouterr().out)
    assert (summary["n_labelled"], summary["n_unlabelled"], summary["n_test"]) == (40, 120, 40)
    config = load_config([REPO / "config.yaml", REPO / "configs" / "unlabelled-hippocampus.yaml"], base_dir=tmp_path)
    assert (tmp_path / config["dataset"]["raw"]).resolve() == (tmp_path / summary["raw"]).resolve()
    assert config["student"]["unlabelled_share"] == [0.0, 0.5]
