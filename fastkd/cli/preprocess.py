"""``fastkd preprocess``: nnU-Net planning and preprocessing, or adopting a dataset preprocessed already."""

from __future__ import annotations

from pathlib import Path

from fastkd.cli.common import _stage, config_flag, set_threads


def add_parser(sub) -> None:
    stage = _stage(sub, "preprocess", "nnU-Net planning and preprocessing")
    p = stage.add_parser("run", help="nnU-Net fingerprint, planning and preprocessing, nnU-Net's split, manifests")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id")
    p.add_argument("--raw-source", type=Path, required=True, help="raw dataset folder DatasetXXX_Name")
    p.add_argument("-c", "--configurations", nargs="+", required=True, choices=["2d", "3d_fullres", "3d_lowres"])
    p.add_argument("--manifests", nargs="+", type=Path, required=True, help="one manifest path per configuration")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--planner", default="ExperimentPlanner",
                       help="nnU-Net experiment planner class (default ExperimentPlanner; nnUNetPlannerResEncM/L/XL)")
    group.add_argument("--plans-from", type=Path, default=None,
                       help="use the plans.json of this existing teacher model folder instead of planning")
    config_flag(p, ["-np", "--num-processes"], "plans.num_processes", "worker processes")
    config_flag(p, ["--gpu-memory-target"], "plans.gpu_memory_target_gb", "planner GPU memory target in GB")
    config_flag(p, ["--holdout"], "dataset.holdout.n_test", "labelled cases to hold back as the test set, never "
                "shown to nnU-Net", metavar="N")
    config_flag(p, ["--holdout-seed"], "dataset.holdout.seed", "which cases to hold back", metavar="S")
    p.set_defaults(func=_preprocess_run)
    p = stage.add_parser("adopt", help="a dataset preprocessed already (nnUNetv2_plan_and_preprocess): check every "
                                       "case, write nnU-Net's split if missing, and the manifests")
    p.add_argument("-d", "--dataset", required=True, help="dataset name DatasetXXX_Name")
    p.add_argument("-p", "--plans", required=True, help="plans name the dataset was preprocessed with")
    p.add_argument("-c", "--configurations", nargs="+", required=True, choices=["2d", "3d_fullres", "3d_lowres"])
    p.add_argument("--manifests", nargs="+", type=Path, required=True, help="one manifest path per configuration")
    p.set_defaults(func=_preprocess_adopt)
    p = stage.add_parser("unlabelled", help="check and preprocess unlabelled images (dataset.unlabelled) with the "
                                            "teachers' plans, and write their manifest")
    p.add_argument("source", type=Path, help="folder of unlabelled images <case>_0000<file_ending>, ...")
    p.add_argument("-d", "--dataset", required=True, help="dataset name DatasetXXX_Name (preprocessed already)")
    p.add_argument("-p", "--plans", required=True, help="the teachers' plans name")
    p.add_argument("-c", "--configuration", required=True, choices=["2d", "3d_fullres", "3d_lowres"])
    p.add_argument("--raw", type=Path, required=True,
                   help="the labelled raw dataset (dataset.raw): no unlabelled image may be one of its cases")
    p.add_argument("--test-images", type=Path, default=None,
                   help="the test images (imagesTs): no unlabelled image may be one of them")
    p.add_argument("--manifest", type=Path, required=True, help="where to write the manifest")
    p.set_defaults(func=_preprocess_unlabelled)


def _preprocess_run(args) -> None:
    from fastkd.preprocess import plan_preprocess

    set_threads(args.num_processes, training=True)  # the planner sizes torch's pool by nnUNet_n_proc_DA
    plans = plan_preprocess(args.dataset_id, args.raw_source, args.configurations, args.manifests,
                            planner_class=args.planner, teacher_folder=args.plans_from,
                            num_processes=args.num_processes, gpu_memory_target_gb=args.gpu_memory_target,
                            holdout_n_test=args.holdout, holdout_seed=args.holdout_seed)
    print(f"plans {plans}: preprocessed {', '.join(args.configurations)}")


def _preprocess_adopt(args) -> None:
    from fastkd.preprocess import adopt_preprocessed

    cases = adopt_preprocessed(args.dataset, args.plans, args.configurations, args.manifests)
    print(f"{args.dataset} ({args.plans}): {len(cases)} preprocessed cases of {', '.join(args.configurations)}")


def _preprocess_unlabelled(args) -> None:
    from fastkd import nnunet
    from fastkd.cases import held_out_cases
    from fastkd.unlabelled import preprocess_unlabelled, reference_images

    dataset_json = nnunet.read_dataset_json(args.raw)
    test = held_out_cases(args.test_images, dataset_json) if args.test_images else []
    manifest = preprocess_unlabelled(args.source, args.dataset, args.plans, args.configuration, args.manifest,
                                     references=reference_images(args.raw, args.test_images, dataset_json),
                                     training_cases=nnunet.raw_case_ids(args.raw), test_cases=test)
    print(f"{len(manifest['cases'])} unlabelled images of {args.source} preprocessed ({manifest['preprocessed_now']} "
          f"now, the rest reused) -> {args.manifest}")
