"""The built-in demo: a deterministic synthetic 3D segmentation dataset in nnU-Net v2 raw layout.

The demo lets ``snakemake --cores all`` run the whole pipeline for real on a laptop CPU, so the cases
are small (32 x 40 x 32 voxels) and a 2-core machine preprocesses them and trains small nnU-Nets on
them in minutes.

By job: :mod:`.options` checks the settings (config ``dataset.demo``, ``fastkd demo write``) and answers
what config validation and Snakemake ask at parse time; :mod:`.organ_lesion` draws the default demo's
organ and lesion, :mod:`.atlas` the many structures of any other ``n_structures``, both with the drawing
and rendering of :mod:`.render`; :mod:`.label_noise` draws the training labels as an annotator might;
:mod:`.writer` writes the dataset (:func:`make_demo_dataset`), optionally with unlabelled images in
``imagesUnlabelled/`` (:data:`UNLABELLED_FOLDER`, :func:`unlabelled_case_ids`). Each module describes what it
draws.
"""

from fastkd.demo.options import (
    DEFAULT_N_CASES,
    DEFAULT_N_TEST,
    DEFAULT_SHAPE,
    UNLABELLED_FOLDER,
    case_ids,
    check_options,
    cli_options,
    image_options,
    demo_geometry,
    held_out_case_ids,
    resources,
    unlabelled_case_ids,
)
from fastkd.demo.organ_lesion import LABELS
from fastkd.demo.writer import dataset_labels, label_names, make_demo_dataset, write_unlabelled_images

__all__ = [
    "DEFAULT_N_CASES",
    "DEFAULT_N_TEST",
    "DEFAULT_SHAPE",
    "LABELS",
    "UNLABELLED_FOLDER",
    "case_ids",
    "check_options",
    "cli_options",
    "dataset_labels",
    "demo_geometry",
    "held_out_case_ids",
    "image_options",
    "label_names",
    "make_demo_dataset",
    "resources",
    "unlabelled_case_ids",
    "write_unlabelled_images",
]
