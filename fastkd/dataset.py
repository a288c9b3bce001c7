"""The dataset being distilled: its nnU-Net name and its training cases, known at parse time.

The case list is read from the raw ``dataset.json`` (or, for the demo, computed from the config)
when Snakemake parses the workflow, so every per-case job is in the DAG from the start and
Snakemake's incomplete-output tracking covers it (a ``checkpoint`` rule would bypass that).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DATASET_NAME_PATTERN = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9_\-]+)$")


def dataset_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def parse_dataset_name(folder_name: str) -> tuple[int, str]:
    """``Dataset004_Hippocampus`` -> ``(4, 'Hippocampus')``."""
    m = DATASET_NAME_PATTERN.match(folder_name)
    if m is None:
        raise ValueError(f"{folder_name!r} is not an nnU-Net dataset folder name (DatasetXXX_Name, e.g. Dataset004_Hippocampus)")
    return int(m.group(1)), m.group(2)


def raw_case_ids(raw_dataset: str | Path) -> list[str]:
    """Training case identifiers of a raw nnU-Net dataset, the way nnU-Net itself finds them."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    raw_dataset = Path(raw_dataset)
    with open(raw_dataset / "dataset.json") as f:
        dataset_json = json.load(f)
    cases = get_filenames_of_train_images_and_targets(str(raw_dataset), dataset_json)
    if not cases:
        raise ValueError(f"{raw_dataset}: dataset.json lists no training cases and imagesTr/ holds none")
    return sorted(cases)
