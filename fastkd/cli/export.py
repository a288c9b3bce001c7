"""``fastkd export``: a trained model to ONNX, an ONNX export to a TensorRT engine, each checked for parity."""

from __future__ import annotations

from pathlib import Path

from fastkd.cli.common import _stage, config_flag, fold_arg, positive_int


def add_parser(sub) -> None:
    stage = _stage(sub, "export", "export a trained student for deployment")
    p = stage.add_parser("onnx", help="export one fold to ONNX (metadata inside), verified against PyTorch")
    p.add_argument("model_folder", type=Path, help="nnU-Net model folder Trainer__Plans__configuration")
    p.add_argument("-f", "--fold", type=fold_arg, default=0, help="0-4 or 'all' (default 0)")
    p.add_argument("-o", "--output", type=Path, required=True, help="the .onnx to write (and <output>.json)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint in fold_X (default final)")
    p.add_argument("--input-shape", type=positive_int, nargs="+", default=None, metavar="N",
                   help="b c x y z (default: batch, the input channels and nnU-Net's patch)")
    p.add_argument("--batch", type=int, default=1, help="batch size, 0 = dynamic (default 1)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch and spatial dims (multiples of the stride)")
    p.add_argument("--simplify", action="store_true", help="simplify the graph with onnxslim")
    p.add_argument("--tensorrt", action="store_true",
                   help="TensorRT-friendly: constant folding and a simplified graph (onnxslim)")
    p.add_argument("--preprocessed", type=Path, default=None,
                   help="preprocessed <case>.b2nd for the parity check (default: nnU-Net's, in $nnUNet_preprocessed)")
    p.add_argument("--atol", type=float, default=1e-3, help="largest |logit difference| accepted (default 1e-3)")
    p.add_argument("--min-agreement", type=float, default=0.999,
                   help="smallest fraction of voxels whose segmentation agrees (default 0.999)")
    p.set_defaults(func=_export_onnx)
    p = stage.add_parser("trt", help="build a TensorRT engine of an ONNX export (metadata beside it), checked against "
                                     "onnxruntime; needs TensorRT and an NVIDIA GPU")
    p.add_argument("onnx", type=Path, help="an .onnx written by `fastkd export onnx`")
    p.add_argument("-o", "--output", type=Path, required=True, help="the .engine (or .plan) to write (and <output>.json)")
    config_flag(p, ["--precision"], "export.tensorrt.precision",
                "fp32, fp16 or int8 (calibrated; needs --calibration); normalization layers stay FP32")
    for bound in ("min", "opt", "max"):
        p.add_argument(f"--{bound}-shape", type=positive_int, nargs="+", default=None, metavar="N",
                       help=f"b c x y z, the optimization profile's {bound} (default: the ONNX's static shape, or "
                            "nnU-Net's patch; a dynamic batch: min 1, opt min(8, --max-batch), max --max-batch)")
    config_flag(p, ["--max-batch"], "export.tensorrt.max_batch",
                "largest batch of the default profile (> 1 needs an ONNX with a dynamic batch: export onnx --batch 0)")
    p.add_argument("--calibration", type=Path, default=None,
                   help="folder of preprocessed <case>.b2nd: int8 calibration data and the real patches of the parity "
                        "gate (default for the gate: nnU-Net's, in $nnUNet_preprocessed; one of them is required)")
    p.add_argument("--timing-cache", type=Path, default=None,
                   help="TensorRT timing cache file, reused between builds (default: tensorrt_timing.cache beside the engine)")
    config_flag(p, ["--workspace-gb"], "export.tensorrt.workspace_gb", "builder workspace, GB of GPU memory")
    p.add_argument("--min-agreement", type=float, default=0.999,
                   help="smallest fraction of voxels whose segmentation agrees with onnxruntime (default 0.999)")
    p.add_argument("--force", action="store_true", help="rebuild even when the engine is up to date")
    p.set_defaults(func=_export_trt)


def _export_onnx(args) -> None:
    from fastkd.export.onnx import export_onnx

    record = export_onnx(args.model_folder, args.fold, args.output, checkpoint=args.checkpoint,
                         input_shape=args.input_shape, batch=args.batch, dynamic=args.dynamic, simplify=args.simplify,
                         tensorrt=args.tensorrt, preprocessed=args.preprocessed, atol=args.atol,
                         min_agreement=args.min_agreement)
    worst = max(c["max_abs_diff"] for c in record["checks"])
    print(f"wrote {args.output} ({record['bytes'] / 1e6:.1f} MB): onnxruntime vs PyTorch on {len(record['checks'])} "
          f"inputs ({record['real_patches']} real), max |logit difference| {worst:.2g}, agreement "
          f"{min(c['agreement'] for c in record['checks']):.6f}; verification in {args.output}.json")


def _export_trt(args) -> None:
    from fastkd.export.tensorrt import build_engine

    profile = {"min": args.min_shape, "opt": args.opt_shape, "max": args.max_shape}
    record = build_engine(args.onnx, args.output, precision=args.precision, profile=profile, max_batch=args.max_batch,
                          calibration=args.calibration, timing_cache=args.timing_cache, workspace_gb=args.workspace_gb,
                          min_agreement=args.min_agreement, force=args.force)
    platform = f"TensorRT {record['tensorrt_version']}, {record['gpu']['name']}"
    if not record["built"]:
        print(f"{args.output}: up to date ({record['precision']}, {platform}, profile {record['profile']}); "
              "--force rebuilds it")
        return
    gating = [c for c in record["parity"]["checks"] if c["gating"]]
    norm = record["normalization"]
    print(f"wrote {args.output} ({record['precision']}, {platform}, profile {record['profile']}, "
          f"{len(record['fp32_layers'])} layers asked to stay FP32; normalization: {len(norm['layers'])} engine layers, "
          f"{len(norm['fused_nodes'])} of {norm['nodes']} nodes fused into Myelin) in {record['seconds']:.0f} s: "
          f"agreement with onnxruntime {min(c['agreement'] for c in gating):.6f} on {len(gating)} batches of "
          f"{record['parity']['real_patches']} real patches; metadata in {args.output}.json")
