"""Student plans: the teacher's nnU-Net plans with an r times narrower network.

A student plans file is the teacher's plans file with, in every configuration that defines an
``architecture``:

- ``features_per_stage = [max(f // r, floor) for f in teacher]``, ``floor = FEATURE_FLOOR = 8``:
  the floor keeps the first stages from collapsing to a handful of channels at large r (r = 16 turns
  ``[32, 64, 128, ...]`` into ``[8, 8, 8, ...]``, not ``[2, 4, 8, ...]``). r = 1 keeps the widths.
- the same topology otherwise: ``n_stages``, ``kernel_sizes``, ``strides``, ``n_conv_per_stage``,
  ``n_conv_per_stage_decoder``, norm, nonlinearity, everything else in ``arch_kwargs`` as in the
  teacher. Patch size, batch size, spacing and normalization are the teacher's too.
- ResidualEncoderUNet teachers (``n_blocks_per_stage``) also get a block strategy, per stage n:

  ============  ============================  ==============================
  strategy      blocks per encoder stage      r = 2, 4, 8 on n = 1 / 6
  ============  ============================  ==============================
  ``reduce``    ``max(n // 2, 1)``            1 / 3
  ``keep``      ``n`` (default)               1 / 6
  ``increase``  ``min(n + 1, 8)``             2 / 7
  ``adaptive``  ``min(n + r // 4, 8)``        r=2: 1 / 6, r=4: 2 / 7, r=8: 3 / 8
  ============  ============================  ==============================

  These are the reference's (FastnnUNet) rules; its ``int(ratio / 4)`` takes the reduction factor
  as ratio, so ``adaptive`` keeps the depth for r < 4 and adds one block per stage for every 4 of r
  (a narrower student gets deeper encoder stages), capped at 8 like ``increase``. The decoder
  (``n_conv_per_stage_decoder``) is kept. PlainConvUNet teachers have no blocks: only ``keep`` is
  valid for them.

Configurations that only ``inherits_from`` another (nnU-Net's ``3d_cascade_fullres``) are left as
they are: nnU-Net's ``PlansManager`` resolves a configuration by updating its parent's (resolved)
dict with its own keys, so one without its own ``architecture`` gets its parent's, which is
reduced here, and one with its own ``architecture`` has that one reduced. Every
``ConfigurationManager`` of the student plans thus returns the student network.

``data_identifier`` stays the teacher's: the student trains on the teacher's preprocessed arrays
(and on soft labels computed on them). Never run nnU-Net preprocessing with student plans: it would
delete and rewrite the teacher's shared ``<data_identifier>/`` folder. The plans carry a marker that
says so, which nnU-Net ignores (``PlansManager`` only reads the keys it knows)::

    "fastkd": {"teacher_plans_name", "reduction_factor", "block_strategy" (null for plain teachers),
               "feature_floor"}

The student ``plans_name`` is ``<teacher plans name>_fastkdR<r>`` (plus the block strategy for
ResEnc teachers, e.g. ``nnUNetResEncUNetLPlans_fastkdR2keep``); it never contains ``__``, which
separates trainer, plans and configuration in nnU-Net's model folder names.
"""

from __future__ import annotations

import copy
import json
import numbers
from pathlib import Path

from fastkd import nnunet
from fastkd.errors import FastkdError
from fastkd.io import atomic_write_text

BLOCK_STRATEGIES = ("reduce", "keep", "increase", "adaptive")
FEATURE_FLOOR = 8
MAX_BLOCKS = 8  # cap of "increase" and "adaptive", as in the reference


def _check_r(r) -> int:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise FastkdError(f"reduction factor r = {r!r}: must be an integer >= 1 (1 keeps the teacher's widths)")
    return int(r)


def _check_strategy(block_strategy) -> str:
    if block_strategy not in BLOCK_STRATEGIES:
        raise FastkdError(f"block strategy {block_strategy!r}: must be one of {', '.join(BLOCK_STRATEGIES)}")
    return block_strategy


def student_plans_name(teacher_plans_name: str, r: int, block_strategy: str | None = None) -> str:
    """``nnUNetPlans`` -> ``nnUNetPlans_fastkdR2``; with a block strategy (ResEnc) ``..._fastkdR2keep``."""
    r = _check_r(r)
    if block_strategy is not None:
        _check_strategy(block_strategy)
    if "__" in teacher_plans_name:
        raise FastkdError(f"teacher plans name {teacher_plans_name!r} contains '__', which nnU-Net uses to separate "
                          "trainer, plans and configuration in model folder names; rename the plans")
    return nnunet.STUDENT_PLANS_NAME.format(plans=teacher_plans_name, r=r, strategy=block_strategy or "")


def _blocks(n: int, block_strategy: str, r: int) -> int:
    if block_strategy == "reduce":
        return max(n // 2, 1)
    if block_strategy == "increase":
        return min(n + 1, MAX_BLOCKS)
    if block_strategy == "adaptive":
        return min(n + r // 4, MAX_BLOCKS)
    return n


def derive_student_plans(teacher_plans: dict, r: int, block_strategy: str = "keep", floor: int = FEATURE_FLOOR) -> dict:
    """The student plans of ``teacher_plans`` (a new dict; the rules are in the module docstring)."""
    r = _check_r(r)
    _check_strategy(block_strategy)
    if isinstance(floor, bool) or not isinstance(floor, numbers.Integral) or floor < 1:
        raise FastkdError(f"feature floor {floor!r}: must be an integer >= 1")
    plans = copy.deepcopy(teacher_plans)
    configurations = plans["configurations"]
    own = [c for c, cfg in configurations.items() if "architecture" in cfg]
    networks = {c: nnunet.network_name(plans, c) for c in configurations}  # each must resolve to a network
    resenc = [c for c in own if networks[c] == nnunet.RESENC_NETWORK]
    if not resenc and block_strategy != "keep":
        raise FastkdError(f"block strategy {block_strategy!r} only applies to ResidualEncoderUNet (ResEnc) teachers; "
                          f"the plans {teacher_plans['plans_name']} have {', '.join(sorted({networks[c] for c in own}))}"
                          " (use 'keep')")
    for c in own:
        kwargs = configurations[c]["architecture"]["arch_kwargs"]
        if "features_per_stage" not in kwargs:
            raise FastkdError(f"configuration {c!r}: network {configurations[c]['architecture']['network_class_name']} "
                              "has no arch_kwargs.features_per_stage; fastkd derives students of PlainConvUNet and "
                              "ResidualEncoderUNet plans")
        kwargs["features_per_stage"] = [max(int(f) // r, floor) for f in kwargs["features_per_stage"]]
        if c in resenc:
            kwargs["n_blocks_per_stage"] = [_blocks(int(n), block_strategy, r) for n in kwargs["n_blocks_per_stage"]]
    strategy = block_strategy if resenc else None
    plans["plans_name"] = student_plans_name(teacher_plans["plans_name"], r, strategy)
    plans["fastkd"] = {"teacher_plans_name": teacher_plans["plans_name"], "reduction_factor": r,
                       "block_strategy": strategy, "feature_floor": int(floor)}
    return plans


def write_student_plans(teacher_plans_file: str | Path, out_file: str | Path, r: int, block_strategy: str = "keep") -> dict:
    """Derive the student plans of a teacher plans file and write them (atomically) to ``out_file``.

    nnU-Net finds plans as ``nnUNet_preprocessed/<dataset>/<plans_name>.json``: to train with them,
    ``out_file`` belongs there under that name (``fastkd student plans`` does so by default).
    """
    plans = derive_student_plans(nnunet.read_plans(teacher_plans_file), r, block_strategy)
    atomic_write_text(out_file, json.dumps(plans, indent=2) + "\n")
    return plans


def count_parameters_and_flops(plans: dict, dataset_json: dict, configuration: str) -> dict:
    """Size and cost of a configuration's network, built by nnU-Net itself (deep supervision off).

    ``parameters``: every parameter of the module nnU-Net builds (including the deep-supervision
    heads the module holds even with deep supervision off, as in its checkpoints).
    ``flops``: 2 x multiply-adds of the Conv and ConvTranspose layers run by one forward pass of one
    patch (batch 1, the configuration's ``patch_size``, deep supervision off), bias, normalization,
    nonlinearities and skip additions not counted. Conv: ``2 * out.numel() * C_in / groups * prod(k)``;
    ConvTranspose: ``2 * in.numel() * C_out / groups * prod(k)``. The network runs on PyTorch's meta
    device (shapes only, nothing allocated), so real plans cost milliseconds.
    """
    import torch

    with torch.device("meta"):
        network, n_in, _ = nnunet.build_network(plans, configuration, dataset_json, allow_init=False)
    cm = nnunet.configuration(plans, configuration)
    flops = 0

    def count(module, inputs, output):
        nonlocal flops
        k = 1
        for s in module.kernel_size:
            k *= s
        if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
            flops += 2 * inputs[0].numel() * (module.out_channels // module.groups) * k
        else:
            flops += 2 * output.numel() * (module.in_channels // module.groups) * k

    hooks = [m.register_forward_hook(count) for m in network.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    with torch.no_grad():
        network(torch.zeros((1, n_in, *cm["patch_size"]), device="meta"))
    for h in hooks:
        h.remove()
    return {"parameters": sum(p.numel() for p in network.parameters()), "flops": flops,
            "patch_size": list(cm["patch_size"]),
            "features_per_stage": list(cm["architecture"]["arch_kwargs"]["features_per_stage"])}


def format_info(teacher_plans: dict, student_plans: dict, dataset_json: dict, configurations: list[str] | None = None) -> str:
    """Table of teacher vs student parameters and GFLOPs per patch, one row per configuration."""
    if configurations is None:
        configurations = [c for c in teacher_plans["configurations"] if c in student_plans["configurations"]]
    for plans in (teacher_plans, student_plans):
        missing = [c for c in configurations if c not in plans["configurations"]]
        if missing:
            raise FastkdError(f"configuration(s) {missing} not in the plans {plans['plans_name']} "
                              f"(they have: {', '.join(plans['configurations'])})")
    marker = student_plans.get("fastkd") or {}
    lines = [f"teacher {teacher_plans['plans_name']} -> student {student_plans['plans_name']}"
             + (f" (r = {marker['reduction_factor']}, block strategy {marker['block_strategy'] or '-'}, "
                f"feature floor {marker['feature_floor']})" if marker else "")]
    header = ("configuration", "network", "teacher params", "student params", "ratio",
              "teacher GFLOPs/patch", "student GFLOPs/patch", "ratio")
    rows, notes = [], []
    for c in configurations:
        t = count_parameters_and_flops(teacher_plans, dataset_json, c)
        s = count_parameters_and_flops(student_plans, dataset_json, c)
        network = nnunet.network_name(teacher_plans, c)
        rows.append((c, network, f"{t['parameters'] / 1e6:.2f} M", f"{s['parameters'] / 1e6:.2f} M",
                     f"{t['parameters'] / s['parameters']:.1f}x", f"{t['flops'] / 1e9:.2f}", f"{s['flops'] / 1e9:.2f}",
                     f"{t['flops'] / s['flops']:.1f}x"))
        notes.append(f"  {c}: patch {t['patch_size']}, features {t['features_per_stage']} -> {s['features_per_stage']}")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines + notes)
