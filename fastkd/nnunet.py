"""The one adapter to nnU-Net's own files: dataset names and cases, dataset.json, plans, model folders.

Every stage reads nnU-Net's files (the teachers' plans, the preprocessed dataset's plans, student
plans, dataset.json, model folders); they all read them through here, so that nnU-Net's rules are
followed in one place:

- a dataset is ``DatasetXXX_Name``; its training cases are what nnU-Net itself finds in the raw folder;
- a plans configuration is resolved by nnU-Net's own ``PlansManager`` (``inherits_from``, and old
  plans formats converted as nnU-Net converts them);
- a model folder is ``<trainer>__<plans>__<configuration>`` (``__`` never appears inside a part);
- the planners fastkd runs, and the plans names they write, are :data:`PLANNERS`.

Nothing here writes a file.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from fastkd.errors import FastkdError
from fastkd.io import read_json

#: config name -> (nnU-Net experiment planner class, plans name it writes)
PLANNERS = {
    "default": ("ExperimentPlanner", "nnUNetPlans"),
    "ResEncM": ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"),
    "ResEncL": ("nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans"),
    "ResEncXL": ("nnUNetPlannerResEncXL", "nnUNetResEncUNetXLPlans"),
}
DATASET_NAME_PATTERN = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9_\-]+)$")
RESENC_NETWORK = "ResidualEncoderUNet"
#: fastkd's student plans beside the plans they derive from (see :mod:`fastkd.student.plans`); a plain
#: format, so a Snakemake wildcard ``{r}`` passes through it
STUDENT_PLANS_NAME = "{plans}_fastkdR{r}{strategy}"


# -- datasets -------------------------------------------------------------------------------------
def dataset_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def parse_dataset_name(folder_name: str) -> tuple[int, str]:
    """``Dataset004_Hippocampus`` -> ``(4, 'Hippocampus')``."""
    m = DATASET_NAME_PATTERN.match(folder_name)
    if m is None:
        raise ValueError(f"{folder_name!r} is not an nnU-Net dataset folder name (DatasetXXX_Name, e.g. Dataset004_Hippocampus)")
    return int(m.group(1)), m.group(2)


def find_dataset(value: str, roots: list[Path]) -> str:
    """``-d`` as nnU-Net's commands take it: a dataset name, or an id looked up in ``roots``."""
    if DATASET_NAME_PATTERN.match(value):
        return value
    if not value.isdigit():
        raise FastkdError(f"-d {value!r}: expected a dataset id (e.g. 4) or name (e.g. Dataset004_Hippocampus)")
    prefix = f"Dataset{int(value):03d}_"
    found = sorted({p.name for root in roots if root.is_dir() for p in root.iterdir()
                    if p.name.startswith(prefix) and DATASET_NAME_PATTERN.match(p.name)})
    if len(found) != 1:
        raise FastkdError(f"-d {value}: " + (f"several datasets have id {int(value)}: {', '.join(found)}; give its name"
                                             if found else f"no {prefix}* folder in {', '.join(map(str, roots))}"))
    return found[0]


def read_dataset_json(folder: str | Path) -> dict:
    """``dataset.json`` of a raw dataset, preprocessed dataset or model folder."""
    return read_json(Path(folder) / "dataset.json", "dataset.json", "every nnU-Net dataset and model folder has one")


def raw_case_ids(raw_dataset: str | Path) -> list[str]:
    """Training case identifiers of a raw nnU-Net dataset, the way nnU-Net itself finds them."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    raw_dataset = Path(raw_dataset)
    cases = get_filenames_of_train_images_and_targets(str(raw_dataset), read_dataset_json(raw_dataset))
    if not cases:
        raise ValueError(f"{raw_dataset}: dataset.json lists no training cases and imagesTr/ holds none")
    return sorted(cases)


# -- plans ----------------------------------------------------------------------------------------
def read_plans(path: str | Path) -> dict:
    """An nnU-Net plans JSON; FastkdError if it is missing or not a plans file."""
    plans = read_json(path, "plans file", "nnU-Net writes plans when it plans a dataset")
    if not isinstance(plans, dict) or "configurations" not in plans or "plans_name" not in plans:
        raise FastkdError(f"{path} is not an nnU-Net plans file (no 'plans_name' / 'configurations')")
    return plans


def _check_inheritance(plans: dict, name: str) -> None:
    """A clear error for a configuration that is missing or whose ``inherits_from`` chain is broken."""
    configurations = plans["configurations"]
    if name not in configurations:
        raise FastkdError(f"configuration {name!r} not in the plans {plans.get('plans_name')} "
                          f"(they have: {', '.join(configurations)})")
    seen = [name]
    while "inherits_from" in configurations[seen[-1]]:
        parent = configurations[seen[-1]]["inherits_from"]
        if parent in seen or parent not in configurations:
            raise FastkdError(f"configuration {name!r}: inherits_from chain {' -> '.join(seen + [parent])} "
                              f"is {'circular' if parent in seen else 'broken'}")
        seen.append(parent)


def configuration(plans: dict, name: str) -> dict:
    """A plans configuration as nnU-Net uses it: ``inherits_from`` resolved by nnU-Net's ``PlansManager``."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    _check_inheritance(plans, name)
    try:
        return dict(PlansManager(plans).get_configuration(name).configuration)
    except RuntimeError as e:  # an old plans format nnU-Net cannot convert
        raise FastkdError(f"configuration {name!r} of the plans {plans.get('plans_name')}: {e}; re-plan the "
                          "dataset with the installed nnU-Net") from None


def data_identifier(plans: dict, name: str) -> str:
    """The preprocessed-data folder a configuration reads (``<data_identifier>/`` beside the plans)."""
    return configuration(plans, name)["data_identifier"]


def network_name(plans: dict, name: str) -> str:
    """Short class name of a configuration's network, e.g. ``PlainConvUNet``."""
    return configuration(plans, name)["architecture"]["network_class_name"].split(".")[-1]


def is_resenc(plans: dict, name: str) -> bool:
    """Whether the configuration's network is a ResidualEncoderUNet (following ``inherits_from``)."""
    return network_name(plans, name) == RESENC_NETWORK


def build_network(plans: dict, configuration_name: str, dataset_json: dict, deep_supervision: bool = False,
                  allow_init: bool = True):
    """The configuration's network exactly as nnU-Net builds it from the plans (``get_network_from_plans``,
    input channels and segmentation heads from the plans and dataset.json). Returns ``(network, n_in, n_out)``."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    configuration(plans, configuration_name)  # FastkdError naming the configurations the plans have
    plans_manager = PlansManager(plans)
    cm = plans_manager.get_configuration(configuration_name)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    n_in = determine_num_input_channels(plans_manager, cm, dataset_json)
    network = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, n_in, n_out, allow_init=allow_init,
                                     deep_supervision=deep_supervision)
    return network, n_in, n_out


# -- model folders and checkpoints ----------------------------------------------------------------
def model_folder_name(trainer: str, plans_name: str, configuration_name: str) -> str:
    """nnU-Net's model folder name ``<trainer>__<plans>__<configuration>``."""
    return f"{trainer}__{plans_name}__{configuration_name}"


def model_folder_trainer(folder: str | Path) -> str:
    """The trainer part of a model folder's name."""
    return Path(folder).name.split("__")[0]


def found_folds(folder: str | Path) -> dict[str, list[str]]:
    """``{"fold_0": [checkpoint file names], ...}`` of a model folder."""
    return {d.name: sorted(p.name for p in d.iterdir() if p.suffix == ".pth")
            for d in sorted(Path(folder).glob("fold_*")) if d.is_dir()}


def describe_folds(folder: str | Path) -> str:
    """``fold_0: checkpoint_final.pth; fold_1: no checkpoint`` (for error messages)."""
    found = found_folds(folder)
    return "; ".join(f"{d}: {', '.join(c) or 'no checkpoint'}" for d, c in found.items()) or "no fold_X folders"


def load_checkpoint(path: str | Path, _torch_load=None) -> dict:
    """An nnU-Net checkpoint, unpickled with ``weights_only=True``: tensors, containers and numbers only.

    nnU-Net's checkpoints hold numpy scalars in their training log; those (and their dtypes) are the
    only globals allowed. A checkpoint that needs anything else (a pickled object that could run code)
    is refused with the name of what it asked for.
    """
    import re

    import numpy as np
    import torch

    path = Path(path)
    if not path.is_file():
        found = sorted(p.name for p in path.parent.glob("*.pth")) if path.parent.is_dir() else []
        raise FastkdError(f"checkpoint {path} does not exist (checkpoints there: {', '.join(found) or 'none'})")
    core = getattr(np, "_core", None) or np.core  # numpy 2 / 1
    allowed = [core.multiarray.scalar, np.dtype, *{type(np.dtype(t)) for t in ("f4", "f8", "i4", "i8", "?")}]
    try:
        with torch.serialization.safe_globals(allowed):
            return (_torch_load or torch.load)(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError names the global it refused
        refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
        why = f"it asks for {refused.group(1)}" if refused else f"{type(e).__name__}: {str(e).splitlines()[0]}"
        raise FastkdError(f"{path} cannot be loaded safely (torch.load weights_only=True): {why}; fastkd loads only "
                          "checkpoints that hold tensors, containers and numbers, as nnU-Net writes them") from None


@contextmanager
def safe_unpickling():
    """Inside this block every ``torch.load`` is :func:`load_checkpoint`: nnU-Net's own checkpoint loading
    (the predictor's model folders, a trainer's resume) unpickles with ``weights_only=False``; this makes
    it load each checkpoint once, safely, onto the CPU (nnU-Net moves the weights where they belong)."""
    import torch

    stock = torch.load
    torch.load = lambda f, *args, **kwargs: load_checkpoint(f, stock)
    try:
        yield
    finally:
        torch.load = stock
