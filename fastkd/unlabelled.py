"""Unlabelled images (``dataset.unlabelled``): found and checked at parse time, preprocessed with nnU-Net's
own preprocessor and the teachers' plans, then labelled once by the teachers into the soft-label cache
(:func:`fastkd.softlabels.fill_cache`, marked ``unlabelled``) for the KD students to learn from
(``student.unlabelled_share``, :mod:`fastkd.student.trainers`).

**Input.** A folder of images in nnU-Net's naming, ``<case>_<channel:04d><file_ending>``, one file per
channel of the training images (dataset.json's ``channel_names`` and ``file_ending``); the demo writes
``imagesUnlabelled/`` into its dataset (``dataset.demo.n_unlabelled``). Refused, naming the case: a file
outside this naming, a case missing a channel or with one too many, a case id that is a training or test
case, and (when preprocessed) an image whose file is byte-identical to a training or test image, channels
that disagree in shape or spacing, or an image of other dimensions than the training images.

**Preprocessed layout.** nnU-Net's own files (``DefaultPreprocessor.run_case_save`` with no label, as
nnU-Net preprocesses its test images), in a folder of their own so that nnU-Net (which lists
``<data_identifier>/`` when it makes a split, and replaces that folder when it preprocesses) never
mistakes them for training cases::

    nnUNet_preprocessed/<ds>/fastkd_unlabelled/<data_identifier>/
        <case>.b2nd            the image, exactly as nnU-Net preprocesses a training image
        <case>_seg.b2nd        nnU-Net's label of an image without one: 0 inside the nonzero mask, -1 outside.
                               Never used as a label: a KD student drops unlabelled samples from the hard
                               loss (its batch says which samples are unlabelled), whatever they hold, so
                               datasets with an ignore label or regions need nothing else
        <case>.pkl             nnU-Net's properties, without class_locations (the cache holds the teachers')
        fastkd_records/<case>.json   {"sources": {file: sha256}, "plans_sha256"}: written last; a case is
                               reused when both match, else preprocessed again

Each case's three nnU-Net files are written under temporary names and renamed, then the record; a killed
job leaves no case that a later run takes as done. The manifest (:meth:`fastkd.paths.Paths.unlabelled_manifest`)
is a preprocess manifest (:mod:`fastkd.preprocess`) plus ``"unlabelled": true``, ``"folder"`` (the case
folder, relative to the preprocessed dataset) and ``"source"`` (the image folder), written last.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

from fastkd.errors import FastkdError

#: the folder of unlabelled preprocessed cases inside ``nnUNet_preprocessed/<ds>/``
PREPROCESSED_FOLDER = "fastkd_unlabelled"
#: subfolder of a case folder with one record per case (nnU-Net infers its dataset class from the files' endings)
RECORDS = "fastkd_records"


def unlabelled_source(config: dict, raw_dataset: Path) -> Path | None:
    """The folder of unlabelled images of a validated config: ``dataset.unlabelled``, or the demo's
    ``imagesUnlabelled/`` (``dataset.demo.n_unlabelled`` > 0) in ``raw_dataset``; None without any."""
    if config["dataset"]["raw"] == "demo":
        from fastkd.demo import UNLABELLED_FOLDER

        return Path(raw_dataset) / UNLABELLED_FOLDER if config["dataset"]["demo"]["n_unlabelled"] else None
    folder = config["dataset"]["unlabelled"]
    return None if folder is None else Path(folder)


def folder_cases(folder: str | Path, dataset_json: dict) -> dict[str, list[str]]:
    """case -> its image file names (channel order) in ``folder``; FastkdError listing every file outside
    nnU-Net's naming and every case without exactly the dataset's channels."""
    folder, ending = Path(folder), dataset_json["file_ending"]
    n_channels = len(dataset_json["channel_names"])
    if not folder.is_dir():
        raise FastkdError(f"dataset.unlabelled: {folder} is not a folder (give a folder of images named "
                          f"<case>_0000{ending})")
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$")
    channels, strays = {}, []
    for name in sorted(os.listdir(folder)):
        if name.startswith("."):
            continue
        match = pattern.match(name)
        if match is None:
            strays.append(name)
            continue
        channels.setdefault(match.group(1), []).append(int(match.group(2)))
    problems = [f"{name}: not named <case>_<channel:04d>{ending}" for name in strays[:5]]
    want = list(range(n_channels))
    for case, found in sorted(channels.items()):
        if sorted(found) != want:
            problems.append(f"{case}: channels {sorted(found)}, the training images have {n_channels} "
                            f"({', '.join(f'_{c:04d}' for c in want)})")
    if not channels and not problems:
        problems.append(f"no images named <case>_0000{ending}")
    if problems:
        raise FastkdError(f"dataset.unlabelled {folder}:\n  - " + "\n  - ".join(problems[:10])
                          + ("\n  ..." if len(problems) > 10 else ""))
    return {case: [f"{case}_{c:04d}{ending}" for c in want] for case in sorted(channels)}


def check_case_ids(cases, training: list[str], test: list[str]) -> None:
    """An unlabelled case must not be a training or test case (by id)."""
    for what, others in (("training", training), ("test", test)):
        clash = sorted(set(cases) & set(others))
        if clash:
            raise FastkdError(f"dataset.unlabelled: {len(clash)} image(s) have the id of a {what} case "
                              f"({', '.join(clash[:5])}{' ...' if len(clash) > 5 else ''}); an unlabelled image must be "
                              f"neither a training nor a test case: remove it or rename it")


def unlabelled_images(config: dict, raw_dataset: Path) -> dict[str, list[Path]]:
    """case -> its image files, known at parse time (the demo's from its config, a folder's from its files)."""
    folder = unlabelled_source(config, raw_dataset)
    if folder is None:
        return {}
    if config["dataset"]["raw"] == "demo":
        from fastkd.demo import unlabelled_case_ids

        n_channels = config["dataset"]["demo"]["n_channels"]
        return {c: [folder / f"{c}_{ch:04d}.nii.gz" for ch in range(n_channels)]
                for c in unlabelled_case_ids(config["dataset"]["demo"]["n_unlabelled"])}
    from fastkd import nnunet

    dataset_json = nnunet.read_dataset_json(config["dataset"]["raw"])
    return {case: [folder / f for f in files] for case, files in folder_cases(folder, dataset_json).items()}


def _duplicates(images: dict[str, list[Path]], references: list[Path]) -> list[str]:
    """Unlabelled cases with an image file byte-identical to one of ``references`` (by size, then sha256)."""
    from fastkd.io import sha256

    by_size: dict[int, list[Path]] = {}
    for ref in references:
        by_size.setdefault(ref.stat().st_size, []).append(ref)
    hashes: dict[Path, str] = {}
    found = []
    for case, files in images.items():
        for f in files:
            same = by_size.get(f.stat().st_size, [])
            if not same:
                continue
            digest = sha256(f)
            for ref in same:
                if ref not in hashes:
                    hashes[ref] = sha256(ref)
                if hashes[ref] == digest:
                    found.append(f"{case}: {f.name} is the same file as {ref}")
                    break
    return found


def reference_images(raw_dataset: Path, test_images: Path | None, dataset_json: dict) -> list[Path]:
    """The labelled images an unlabelled image must not duplicate: the raw dataset's ``imagesTr/``
    (for a held-out dataset, its source's: held-out test cases included) and the test images."""
    ending = dataset_json["file_ending"]
    folders = [Path(raw_dataset).resolve() / "imagesTr"]
    if test_images is not None:
        folders.append(Path(test_images))
    return [f for folder in folders if folder.is_dir() for f in sorted(folder.glob(f"*{ending}"))]


def preprocess_unlabelled(source: str | Path, dataset: str, plans_name: str, configuration: str,
                          manifest: str | Path, *, references: list[Path] = (), training_cases: list[str] = (),
                          test_cases: list[str] = (), progress: bool = True) -> dict:
    """Check and preprocess every unlabelled image of ``source`` with nnU-Net's preprocessor and the plans
    ``plans_name`` (the teachers'), reusing cases preprocessed already from the same files and plans; write
    the manifest last. Needs ``nnUNet_preprocessed`` in the environment. Returns the manifest."""
    import blosc2
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from tqdm import tqdm

    import nnunetv2
    from fastkd import nnunet
    from fastkd.io import atomic_write_text, package_version, sha256

    if not nnUNet_preprocessed:
        raise FastkdError("nnUNet_preprocessed is not set (Snakemake sets it from the config; export it by hand)")
    dataset_folder = Path(nnUNet_preprocessed) / dataset
    plans_file = dataset_folder / f"{plans_name}.json"
    plans = nnunet.read_plans(plans_file)
    dataset_json = nnunet.read_dataset_json(dataset_folder)
    cfg = nnunet.configuration(plans, configuration)
    source = Path(source)
    images = {case: [source / f for f in files] for case, files in folder_cases(source, dataset_json).items()}
    check_case_ids(images, list(training_cases), list(test_cases))
    duplicates = _duplicates(images, list(references))
    if duplicates:
        raise FastkdError(f"dataset.unlabelled {source}: {len(duplicates)} image(s) duplicate a training or test "
                          "image (a model would learn its label or be tested on what it trained on):\n  - "
                          + "\n  - ".join(duplicates[:10]))
    plans_manager = PlansManager(plans)
    cfg_manager = plans_manager.get_configuration(configuration)
    preprocessor = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "preprocessing"),
                                               cfg_manager.preprocessor_name,
                                               "nnunetv2.preprocessing")(verbose=False)
    relative = Path(PREPROCESSED_FOLDER) / cfg["data_identifier"]
    out = dataset_folder / relative
    (out / RECORDS).mkdir(parents=True, exist_ok=True)
    plans_sha = sha256(plans_file)
    shapes, done = {}, 0
    for case, files in tqdm(images.items(), desc="preprocess unlabelled", unit="case", disable=not progress):
        record = {"sources": {f.name: sha256(f) for f in files}, "plans_sha256": plans_sha}
        record_file = out / RECORDS / f"{case}.json"
        image = out / f"{case}.b2nd"
        current = (record_file.is_file() and image.is_file() and (out / f"{case}_seg.b2nd").is_file()
                   and (out / f"{case}.pkl").is_file() and json.loads(record_file.read_text()) == record)
        if not current:
            record_file.unlink(missing_ok=True)  # from here on the case is not done until the record is back
            _check_geometry(case, files, plans_manager)
            tmp = out / f".{case}.tmp-{os.getpid()}"
            try:
                preprocessor.run_case_save(str(tmp), [str(f) for f in files], None, plans_manager, cfg_manager,
                                           dataset_json)
                for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
                    os.replace(f"{tmp}{suffix}", out / f"{case}{suffix}")
            finally:
                for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
                    Path(f"{tmp}{suffix}").unlink(missing_ok=True)
            atomic_write_text(record_file, json.dumps(record, indent=1) + "\n")
            done += 1
        shapes[case] = {"shape": list(blosc2.open(str(image), mode="r").shape)}
    result = {
        "dataset_name": dataset, "plans_name": plans_name, "configuration": configuration,
        "data_identifier": cfg["data_identifier"], "spacing": list(cfg["spacing"]),
        "patch_size": list(cfg["patch_size"]), "cases": shapes, "nnunetv2_version": package_version("nnunetv2"),
        "unlabelled": True, "folder": str(relative), "source": str(source.resolve()), "preprocessed_now": done,
    }
    atomic_write_text(manifest, json.dumps(result, indent=2) + "\n")
    return result


def teacher_class_locations(probs: np.ndarray, plans: dict, dataset_json: dict, seed: int = 1234) -> dict:
    """An unlabelled case's foreground voxels, what nnU-Net's preprocessor records from a label map for its
    foreground oversampling, here from the teachers' segmentation of the averaged probabilities ``probs``
    (C, x, y, z): nnU-Net's own conversion (argmax, or the region thresholds and order), slab by slab, then
    per foreground label (regions: per region; with an ignore label also nnU-Net's key of every annotated
    voxel, here every voxel) a uniform seeded pick of at most ``CLASS_LOCATIONS_PER_CLASS`` voxels, as
    nnU-Net's sampler picks its (at least 10000). Stored in the case attributes
    (:func:`fastkd.cache.layout.encode_class_locations`).

    Memory beyond ``probs``: the label map (1 byte per voxel, 2 above 255 labels), one boolean mask and the
    indices of one class at a time (measured in docs/unlabelled.md)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from fastkd.cache.layout import CLASS_LOCATIONS_PER_CLASS, encode_class_locations

    import numpy as np

    label_manager = PlansManager(plans).get_label_manager(dataset_json)
    spatial = probs.shape[1:]
    seg = np.empty(spatial, np.uint8 if max(label_manager.all_labels) < 256 else np.int16)
    step = max(1, 2**24 // max(1, int(np.prod(probs.shape)) // spatial[0]))  # x-slabs of <= 16 M values
    for lo in range(0, spatial[0], step):
        seg[lo:lo + step] = np.asarray(label_manager.convert_probabilities_to_segmentation(probs[:, lo:lo + step]))
    keys = list(label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels)
    if label_manager.has_ignore_label:  # what nnU-Net's loader samples from when not forcing foreground
        keys.append(tuple([-1] + label_manager.all_labels))
    rng = np.random.default_rng(seed)
    locations = {}
    for key in keys:
        voxels = np.flatnonzero(np.isin(seg, np.asarray(key if isinstance(key, (tuple, list)) else [key])))
        if len(voxels) > CLASS_LOCATIONS_PER_CLASS:
            voxels = voxels[np.sort(rng.choice(len(voxels), CLASS_LOCATIONS_PER_CLASS, replace=False))]
        coords = np.zeros((len(voxels), 4), np.int64)
        coords[:, 1:] = np.stack(np.unravel_index(voxels, spatial), 1) if len(voxels) else np.zeros((0, 3), np.int64)
        locations[tuple(key) if isinstance(key, list) else key] = coords
    return encode_class_locations(locations)


def _check_geometry(case: str, files: list[Path], plans_manager) -> None:
    """One image per file, the case's channels agreeing in shape and spacing, and the training images'
    dimensions; read with the dataset's own reader (what nnU-Net's preprocessor reads next). nnU-Net's readers
    give a 2-D image a first axis of one slice at spacing 999 (its fingerprint of a 2-D dataset shows the same
    999), so that spacing tells a 2-D image from a 3-D one."""
    import numpy as np

    rw = plans_manager.image_reader_writer_class()
    shapes, spacings = [], []
    for f in files:
        try:
            data, props = rw.read_images([str(f)])
        except Exception as e:  # the reader's own errors: unreadable file, bad header
            raise FastkdError(f"dataset.unlabelled: {case}: cannot read {f} with {type(rw).__name__}: {e}") from e
        if data.shape[0] != 1:
            raise FastkdError(f"dataset.unlabelled: {case}: {f.name} holds {data.shape[0]} images (a 4-D file); "
                              "nnU-Net takes one file per channel, <case>_0000, <case>_0001, ...")
        shapes.append(tuple(data.shape[1:]))
        spacings.append(tuple(float(s) for s in props["spacing"]))
    if len(set(shapes)) > 1 or not all(np.allclose(spacings[0], s, rtol=1e-4) for s in spacings):
        raise FastkdError(f"dataset.unlabelled: {case}: its channels differ in shape {shapes} or spacing {spacings}")
    flat = max(spacings[0]) >= 999
    training_flat = max(plans_manager.plans["original_median_spacing_after_transp"]) >= 999
    if flat != training_flat:
        dims = {True: "2-D", False: "3-D"}
        raise FastkdError(f"dataset.unlabelled: {case}: a {dims[flat]} image, the training images are "
                          f"{dims[training_flat]}")
