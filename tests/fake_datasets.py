"""A real-looking nnU-Net raw dataset (dataset.json, two channels per case, label maps), for the case-set
tests and their dry run."""

import json
from pathlib import Path


DATASET_JSON = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "organ": 1},
                "file_ending": ".nii.gz", "name": "Fake"}



CASES = [f"case_{i:02d}" for i in range(10)]



def _raw_dataset(folder: Path, cases=CASES) -> Path:
    """A real-looking raw dataset: dataset.json, two channels per case, label maps."""
    raw = folder / "Dataset123_Fake"
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({**DATASET_JSON, "numTraining": len(cases)}))
    for case in cases:
        for ch in range(2):
            (raw / "imagesTr" / f"{case}_{ch:04d}.nii.gz").touch()
        (raw / "labelsTr" / f"{case}.nii.gz").touch()
    return raw
