"""The reference system's export commands: FastnnUNet's flags mapped onto :func:`fastkd.export.onnx.export_onnx`.

``nnUNetv2_distillation_export_onnx`` and ``nnUNetv2_resenc_distillation_export_onnx`` find the student
that ``nnUNetv2_(resenc_)distillation_train`` trained (the same flags name it: ``-d -c -f -r``, ``-da5``,
and for ResEnc ``-p -spl -bs``) in ``$nnUNet_results`` and export one fold, with the verification the
workflow's ``export_onnx`` job runs (the same library function): ``onnx.checker``, then onnxruntime
against PyTorch on random and real preprocessed patches; a failed check exits 1 and leaves no model.
Unlike the reference, every flag does what its help says, weights load strictly and safely, and the
parity check can fail.

Output: ``-o`` (a file for the standard command, a folder for the ResEnc one, as in the reference);
default ``$nnUNet_results/../fastkd_work/<dataset>/export/<model folder>/fold_<f>.onnx``, where the
workflow writes its exports. ``<output>.json`` holds the verification.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fastkd.cli.common import fold_arg, huge_pages, positive_int
from fastkd.errors import FastkdError

PROG = "nnUNetv2_distillation_export_onnx"
RESENC_PROG = "nnUNetv2_resenc_distillation_export_onnx"


def build_parser(resenc: bool = False) -> argparse.ArgumentParser:
    from fastkd.config import default
    from fastkd.reference_cli import DEFAULTS, STUDENT_PLANS, reference_parser
    from fastkd.student.plans import BLOCK_STRATEGIES

    parser, ref = reference_parser(
        RESENC_PROG if resenc else PROG, resenc, "-d 4 -f 0 -r 2 -v",
        f"Export a student trained by nnUNetv2_{'resenc_' if resenc else ''}distillation_train to ONNX (fastkd): the "
        "network nnU-Net builds from the student's plans, its checkpoint loaded strictly and safely, one output "
        "(full-resolution logits), the preprocessing in the file's metadata, verified with onnx.checker and "
        "onnxruntime against PyTorch before it is kept.")
    ref.add_argument("-f", "--fold", type=fold_arg, default=0, help="Model fold number: 0-4 or 'all' (default 0)")
    ref.add_argument("-r", "--reduction_factor", type=positive_int, default=default("distillation.reduction_factors")[0],
                     help="Feature reduction factor, must be consistent with training (default 2)")
    ref.add_argument("-cp", dest="checkpoint", default="checkpoint_final.pth",
                     help="Checkpoint file name in fold_X (default checkpoint_final.pth)")
    ref.add_argument("-o", "--output", type=Path, default=None,
                     help=("Output directory (the file is <model folder>__fold_<f>.onnx)" if resenc else
                           "Output ONNX file path") + " (default: fastkd_work/<dataset>/export/<model folder>/"
                          "fold_<f>.onnx beside $nnUNet_results, where the fastkd workflow writes its exports)")
    ref.add_argument("-v", "--verbose", action="store_true", help="Display detailed information: the model's "
                     "metadata and the verification, each check with its max |logit difference| and agreement")
    ref.add_argument("-da", dest="dynamic", action="store_true",
                     help="Use dynamic input shape: batch and spatial dims (multiples of the network's stride)")
    ref.add_argument("-sim", dest="simplify", action="store_true", help="Simplify ONNX model (onnxslim)")
    ref.add_argument("-da5", dest="da5", action="store_true", help="Model was trained with DA5 data augmentation "
                     "(--use_da5: the model folder is nnUNetTrainerFastKD_DA5__...)")
    if resenc:
        ref.add_argument("-b", "--batch_size", type=int, default=1, help="Batch size, 0 means dynamic (default 1)")
        ref.add_argument("-p", "--plans", default=DEFAULTS[True]["teacher_plans"],
                         help=f"Plans identifier of the teachers (default {DEFAULTS[True]['teacher_plans']})")
        ref.add_argument("-spl", "--student_plans", default=None,
                         help=f"Student model plans identifier, as in training (default {STUDENT_PLANS}, or -p where "
                              f"the dataset has no {STUDENT_PLANS})")
        ref.add_argument("-bs", "--block_strategy", choices=BLOCK_STRATEGIES, default=default("student.block_strategy"),
                         help="Block strategy the student was trained with (default keep)")
        ref.add_argument("-fix", "--trt", dest="tensorrt", action="store_true",
                         help="Apply TensorRT compatibility fixes: constant folding and a simplified graph (onnxslim)")
    else:
        ref.add_argument("-is", dest="input_shape", type=positive_int, nargs=5, default=None,
                         metavar=("B", "C", "X", "Y", "Z"), help="Custom input shape b c x y z (static)")
        ref.add_argument("-nn", dest="nnunet_format", action="store_true",
                         help="Export in nnU-Net format: batch 1, the model's input channels, nnU-Net's patch size "
                              "(static; the default shape, spelled out)")
    ext = parser.add_argument_group("fastkd extras (not in FastnnUNet)")
    if not resenc:
        ext.add_argument("-p", "--plans", default=DEFAULTS[False]["teacher_plans"],
                         help="Plans identifier of the teachers, as -tpl in training (default nnUNetPlans)")
    ext.add_argument("--baseline", action="store_true", help="export the no-KD baseline (trained with -a 0)")
    return parser


def resolve(args: argparse.Namespace, environ) -> dict:
    """The model folder, output and export options the flags ask for (reads folders, writes nothing)."""
    from fastkd.nnunet import STUDENT_PLANS_NAME, find_dataset, is_resenc, model_folder_name, read_plans
    from fastkd.reference_cli import NNUNET_VARS, STUDENT_PLANS
    from fastkd.sweep import trainer_name

    missing = [v for v in NNUNET_VARS if not environ.get(v)]
    if missing:
        raise FastkdError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: export nnU-Net's "
                          "folders (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) as for nnUNetv2_predict")
    roots = {v: Path(environ[v]).expanduser().absolute() for v in NNUNET_VARS}
    dataset = find_dataset(str(args.dataset_id), list(roots.values()))
    preprocessed = roots["nnUNet_preprocessed"] / dataset
    base = args.plans
    if args.resenc:
        base = args.student_plans or (STUDENT_PLANS if (preprocessed / f"{STUDENT_PLANS}.json").is_file() else args.plans)
    strategy = None
    if (preprocessed / f"{base}.json").is_file() and is_resenc(read_plans(preprocessed / f"{base}.json"),
                                                                 args.configuration):
        strategy = getattr(args, "block_strategy", "keep")
    plans = STUDENT_PLANS_NAME.format(plans=base, r=args.reduction_factor, strategy=strategy or "")
    results = roots["nnUNet_results"] / dataset
    folder = results / model_folder_name(trainer_name(not args.baseline, args.da5), plans, args.configuration)
    if not folder.is_dir():
        there = sorted(p.name for p in results.iterdir() if p.is_dir()) if results.is_dir() else []
        raise FastkdError(f"no student model folder {folder}; model folders in {results}: {', '.join(there) or 'none'} "
                          "(the flags -r, -c, -da5, -p/-spl/-bs and --baseline name the student as in training)")
    default = roots["nnUNet_results"].parent / "fastkd_work" / dataset / "export" / folder.name / f"fold_{args.fold}.onnx"
    if args.output is None:
        out = default
    elif args.resenc:
        out = args.output / f"{folder.name}__fold_{args.fold}.onnx"
    else:
        out = args.output
    nnunet_format = getattr(args, "nnunet_format", False)
    input_shape = getattr(args, "input_shape", None)
    if nnunet_format and (input_shape or args.dynamic):
        raise FastkdError("-nn exports nnU-Net's fixed patch: leave -is and -da out")
    return {"model_folder": folder, "fold": args.fold, "out": out, "checkpoint": args.checkpoint,
            "input_shape": input_shape, "batch": getattr(args, "batch_size", 1), "dynamic": args.dynamic,
            "simplify": args.simplify, "tensorrt": getattr(args, "tensorrt", False)}


def _main(argv: list[str] | None, resenc: bool) -> int:
    huge_pages()
    from fastkd.export.onnx import export_onnx

    parser = build_parser(resenc)
    args = parser.parse_args(argv)
    try:
        job = resolve(args, os.environ)
        print(f"{parser.prog}: {job['model_folder']} fold {job['fold']} ({job['checkpoint']}) -> {job['out']}", flush=True)
        record = export_onnx(job.pop("model_folder"), job.pop("fold"), job.pop("out"), **job)
    except FastkdError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    worst = max(c["max_abs_diff"] for c in record["checks"])
    print(f"{parser.prog}: wrote {record['onnx']} ({record['bytes'] / 1e6:.1f} MB); onnxruntime vs PyTorch: max |logit "
          f"difference| {worst:.2g}, agreement {min(c['agreement'] for c in record['checks']):.6f} on "
          f"{len(record['checks'])} inputs ({record['real_patches']} real preprocessed patches)")
    if args.verbose:
        print(json.dumps(record, indent=2))
    return 0


def export_onnx_command(argv: list[str] | None = None) -> int:
    """``nnUNetv2_distillation_export_onnx``."""
    return _main(argv, resenc=False)


def resenc_export_onnx_command(argv: list[str] | None = None) -> int:
    """``nnUNetv2_resenc_distillation_export_onnx``."""
    return _main(argv, resenc=True)
