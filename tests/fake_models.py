"""A tiny nnU-Net model folder as nnU-Net writes it (plans, dataset.json, one fold's checkpoint), for the
export, TensorRT and predict tests."""

import json

import numpy as np
import torch

from fastkd.nnunet import build_network


ARCH = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                        "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


PLANS = {"dataset_name": "Dataset900_FastkdDemo", "plans_name": "nnUNetPlans_fastkdR2", "transpose_forward": [0, 1, 2],
         "transpose_backward": [0, 1, 2],
         "foreground_intensity_properties_per_channel": {"0": {"mean": 1.0, "std": 2.0}},
         "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [16, 24, 16],
                                           "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
                                           "use_mask_for_norm": [False], "architecture": ARCH}}}


DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
                "numTraining": 2, "file_ending": ".nii.gz"}


def write_model(root):
    """A model folder as nnU-Net writes it: plans.json, dataset.json, fold_0/checkpoint_final.pth."""
    folder = root / "nnUNetTrainerFastKD__nnUNetPlans_fastkdR2__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(PLANS))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    torch.manual_seed(0)
    network, _, _ = build_network(PLANS, "3d_fullres", DATASET_JSON)
    save_checkpoint(folder / "fold_0" / "checkpoint_final.pth", network.state_dict())
    return folder


def save_checkpoint(path, weights, **extra):
    torch.save({"network_weights": weights, "init_args": {"configuration": "3d_fullres", "fold": 0},
                "trainer_name": "nnUNetTrainer", "logging": {"mean_fg_dice": [np.float64(0.5)]},
                "_best_ema": np.float64(0.5), "current_epoch": 3, "inference_allowed_mirroring_axes": (0, 1, 2),
                "fastkd": {"trainer": "nnUNetTrainerFastKD"}, **extra}, path)


RECORD_KEYS = {"model", "backend", "folds", "device", "mirroring", "step_size", "tile_batch", "tile_batch_wanted",
               "jit", "in_process", "cases", "seconds_total", "seconds_startup", "seconds_network",
               "seconds_network_per_case", "seconds_per_case", "resample", "fastkd_version"}
