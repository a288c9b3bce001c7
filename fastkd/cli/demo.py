"""``fastkd demo``: write the built-in synthetic dataset in nnU-Net raw layout."""

from __future__ import annotations

from pathlib import Path

from fastkd.cli.common import _stage, config_flag
from fastkd.errors import FastkdError


def add_parser(sub) -> None:
    stage = _stage(sub, "demo", "the built-in synthetic dataset")
    p = stage.add_parser("write", help="write the demo dataset in nnU-Net raw layout")
    p.add_argument("output", type=Path, help="dataset folder to write, e.g. nnUNet_raw/Dataset900_FastkdDemo")
    config_flag(p, ["--n-cases"], "dataset.demo.n_cases", "number of cases")
    config_flag(p, ["--n-test"], "dataset.demo.n_test", "held-out test cases (imagesTs/labelsTs)")
    p.add_argument("--anisotropic", action="store_true", help="1 x 1 x 3 mm voxels instead of 1 mm isotropic")
    config_flag(p, ["--seed"], "dataset.demo.seed", "random seed; same seed -> same files")
    config_flag(p, ["--shape"], "dataset.demo.shape", "voxels along x, y, z, e.g. --shape 256 256 200",
                nargs=3, metavar=("X", "Y", "Z"))
    config_flag(p, ["--spacing"], "dataset.demo.spacing", "mm per axis, e.g. --spacing 0.8 0.8 2.5 (not with "
                "--anisotropic)", nargs=3, metavar=("X", "Y", "Z"))
    config_flag(p, ["--n-structures"], "dataset.demo.n_structures", "foreground labels (2: organ + lesion)")
    config_flag(p, ["--n-channels"], "dataset.demo.n_channels", "image channels per case")
    p.add_argument("--regions", action="store_true",
                   help="region-based dataset.json (nested regions, regions_class_order; config dataset.demo.regions)")
    config_flag(p, ["--label-noise"], "dataset.demo.label_noise", "annotation noise in the training labels only, "
                "0 (clean) to 1", metavar="X")
    config_flag(p, ["--n-unlabelled"], "dataset.demo.n_unlabelled", "unlabelled images drawn like the training "
                "cases, written to imagesUnlabelled/ without labels", metavar="N")
    p.set_defaults(func=_demo_write)
    p = stage.add_parser("unlabelled", help="write (or replace) only the unlabelled images of a demo dataset: "
                                            "imagesUnlabelled/, the same files `demo write --n-unlabelled` writes")
    p.add_argument("output", type=Path, help="the demo dataset folder, e.g. nnUNet_raw/Dataset900_FastkdDemo")
    config_flag(p, ["--n-unlabelled"], "dataset.demo.n_unlabelled", "unlabelled images (0 removes the folder)",
                metavar="N")
    p.add_argument("--anisotropic", action="store_true", help="1 x 1 x 3 mm voxels, as the dataset was written")
    config_flag(p, ["--seed"], "dataset.demo.seed", "the dataset's random seed")
    config_flag(p, ["--shape"], "dataset.demo.shape", "voxels along x, y, z", nargs=3, metavar=("X", "Y", "Z"))
    config_flag(p, ["--spacing"], "dataset.demo.spacing", "mm per axis", nargs=3, metavar=("X", "Y", "Z"))
    config_flag(p, ["--n-structures"], "dataset.demo.n_structures", "foreground labels (2: organ + lesion)")
    config_flag(p, ["--n-channels"], "dataset.demo.n_channels", "image channels per case")
    p.set_defaults(func=_demo_unlabelled)


def _demo_write(args) -> None:
    from fastkd.demo import make_demo_dataset

    try:
        cases = make_demo_dataset(args.output, n_cases=args.n_cases, n_test=args.n_test, anisotropic=args.anisotropic, seed=args.seed,
                                  shape=args.shape, spacing=args.spacing, n_structures=args.n_structures,
                                  n_channels=args.n_channels, regions=args.regions, label_noise=args.label_noise,
                                  n_unlabelled=args.n_unlabelled)
    except ValueError as e:  # argument checks of the generator
        raise FastkdError(str(e)) from e
    print(f"wrote {len(cases)} demo training cases, {args.n_test} test cases and {args.n_unlabelled} unlabelled "
          f"images to {args.output}")


def _demo_unlabelled(args) -> None:
    from fastkd.demo import write_unlabelled_images

    try:
        cases = write_unlabelled_images(args.output, args.n_unlabelled, anisotropic=args.anisotropic, seed=args.seed,
                                        shape=args.shape, spacing=args.spacing, n_structures=args.n_structures,
                                        n_channels=args.n_channels)
    except ValueError as e:
        raise FastkdError(str(e)) from e
    print(f"wrote {len(cases)} unlabelled demo images to {args.output}/imagesUnlabelled")
