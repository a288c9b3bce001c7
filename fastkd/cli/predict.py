"""``fastkd predict``: segment images with a model folder (torch), an ONNX export or a TensorRT engine."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fastkd.cli.common import config_flag, fold_arg, positive_int, set_threads
from fastkd.predict import RESAMPLE
from fastkd.predict.backends import BACKENDS


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="segment images through nnU-Net's predictor: a model folder (torch; one fold "
                                       "or an ensemble), an .onnx (onnx) or a TensorRT engine (trt)")
    p.add_argument("-i", "--input", type=Path, required=True, help="folder of images, nnU-Net naming (<case>_0000.nii.gz)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="folder for the segmentations (and fastkd_predict.json, written last)")
    p.add_argument("-m", "--model", type=Path, required=True,
                   help="a model folder (Trainer__Plans__configuration), an .onnx from `fastkd export onnx`, "
                        "or a TensorRT .engine/.plan")
    p.add_argument("--backend", choices=tuple(BACKENDS), default=None,
                   help="torch (model folder), onnx (.onnx) or trt (.engine/.plan); default: from --model")
    p.add_argument("-f", "--folds", type=fold_arg, nargs="+", default=[0],
                   help="folds of the model folder (torch; default 0); several = nnU-Net's ensemble, "
                        "e.g. -f 0 1 2 3 4 as nnUNetv2_predict by default")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint in fold_X (torch)")
    config_flag(p, ["--device"], "student.device", "device")
    p.add_argument("--disable-mirroring", action="store_true", help="no test-time mirroring (1 pass per tile)")
    config_flag(p, ["--step-size"], "softlabels.step_size", "sliding-window step, fraction of the patch")
    p.add_argument("--tile-batch", type=positive_int, default=None,
                   help="network inputs per forward, tiles and their mirrored copies (default: 1 on CPU, "
                        "8 on CUDA; capped by a fixed-batch ONNX or engine)")
    p.add_argument("--jit", action=argparse.BooleanOptionalAction, default=None,
                   help="run the torch network traced and frozen by TorchScript (default: on for torch on the "
                        "CPU, where it is several times faster at a student's width; --no-jit: eager PyTorch)")
    p.add_argument("--resample", choices=RESAMPLE, default=None,
                   help="where each case is resampled to the image and segmented: device (on CUDA, the GPU; the "
                        "default there) or cpu (nnU-Net's own export; the default on the CPU)")
    p.add_argument("--save-probabilities", action="store_true", help="also write the probabilities (.npz)")
    p.add_argument("--threads", type=positive_int, default=2,
                   help="CPU threads, and the workers of each pool: loading/preprocessing, resampling/writing (2)")
    p.set_defaults(func=_predict, action="")


def _predict(args) -> None:
    started = time.perf_counter()  # the record's start-up counts importing torch and nnU-Net
    set_threads(args.threads)  # before nnU-Net is imported: it reads its pool sizes once
    from fastkd.predict.predictor import RECORD, predict

    record = predict(args.input, args.output, args.model, backend=args.backend, folds=args.folds,
                     checkpoint=args.checkpoint, device=args.device, mirroring=not args.disable_mirroring,
                     step_size=args.step_size, save_probabilities=args.save_probabilities, num_processes=args.threads,
                     tile_batch=args.tile_batch, jit=args.jit, resample=args.resample, started=started)
    print(f"{record['cases']} segmentations in {args.output} ({record['backend']}, folds {record['folds']}, "
          f"{record['seconds_per_case']:.2f} s per case of which {record['seconds_network_per_case']:.2f} s network, "
          f"{record['seconds_startup']:.2f} s start-up, {record['tile_batch']} network inputs per forward); "
          f"record in {args.output / RECORD}")
