"""Build here what the GPU machine lacks, in parts that each travel with one command (benchmarks/gpu/README.md).

The GPU machine (no network; Python 3.12, x86-64, torch and the scientific stack preinstalled, see the
README) lacks nnU-Net and the packages below. This script downloads their wheels for that platform
(``pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux...``), builds
wheels here of the pure-Python packages that publish only a source archive (``pip wheel --no-deps``: each
must come out ``py3-none-any``), packs the Hippocampus cases into one tar, and splits everything into
parts (folders ``<dest>/part1``, ``part2``, ...) of at most ``--limit`` bytes each (first fit, largest
wheel first; the data joins the smallest part where it fits, else it is a part of its own).

Each command carries one part: the working tree (``--tree`` bytes allowed for it) plus the part must stay
under the 64 MiB a command takes. A wheel larger than the limit cannot travel and is refused. The plan
(parts, sizes, the commands to send) is printed and written to ``<dest>/plan.json``.

Which packages (``PACKAGES``): every distribution a process of the GPU run imports (benchmarks/gpu/run.py
on the CPU with an import tracer: the top-level modules of ``sys.modules`` at exit of every process, mapped
to distributions) that the GPU machine does not have, and that no package it has imports (sympy, triton,
fsspec for torch; joblib's cloudpickle, scikit-learn's narwhals; tifffile's optional imagecodecs are theirs).
Versions: those this project's environment runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from fastkd.errors import FastkdError  # noqa: E402

MiB = 1 << 20
COMMAND_BYTES = 64 * MiB
PYTHON = "/opt/torch/.venv/bin/python3"  # the GPU machine's Python 3.12 with torch
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
#: (requirement, how): "binary" is downloaded for the GPU machine's platform; "build" has only a source
#: archive on PyPI and is pure Python, so a wheel built here installs there.
PACKAGES = [
    ("nnunetv2==2.8.1", "binary"),
    ("acvl-utils==0.2.6", "build"),
    ("batchgenerators==0.25.5", "build"),
    ("batchgeneratorsv2==0.3.6", "build"),
    ("dynamic-network-architectures==0.4.4", "build"),
    ("simpleitk==2.5.7", "binary"),  # nnU-Net's reader registry imports it (nii.gz reader)
    ("nibabel==5.4.2", "binary"),
    ("connected-components-3d==4.1.1", "binary"),  # acvl_utils' morphology, imported by nnU-Net's predictor
    ("blosc2==4.15.0", "binary"),  # nnU-Net 2.8's preprocessed arrays
    ("ndindex==1.10.1", "binary"),
    ("httpx==0.29.0", "binary"),  # blosc2 4.15 imports it (remote arrays) when imported; httpx imports the three below
    ("click==8.5.1", "binary"),
    ("rich==15.0.0", "binary"),
    ("pygments==2.21.0", "binary"),
    ("zarr==3.1.6", "binary"),  # the soft-label cache
    ("numcodecs==0.16.6", "binary"),
    ("donfig==0.8.1.post1", "binary"),
    ("google-crc32c==1.9.0", "binary"),
    ("jsonschema==4.26.0", "binary"),  # fastkd's config schema
    ("jsonschema-specifications==2025.9.1", "binary"),
    ("referencing==0.37.0", "binary"),
    ("rpds-py==2026.9.1", "binary"),
    ("yacs==0.1.8", "binary"),
    ("graphviz==0.21", "binary"),
]
DATA = "Dataset004_Hippocampus.tar"
#: the GPU run, in the command that brings the data (after its wheels): at most 510 s of the 600 s a command
#: may take; its log's tail is the command's output, its results come back from $OUT/results
RUN = (f"rm -rf .gpu/work && FASTKD_GPU_SITE=$PWD/.gpu/site PYTHONPATH=$PWD/.gpu/site:$PWD timeout 570 {PYTHON} "
       "benchmarks/gpu/run.py --raw .gpu/data/Dataset004_Hippocampus --work .gpu/work --out $OUT/results "
       "--schedule gpu --device cuda --budget 510 --cpus 16 > .gpu/run.log 2>&1; rc=$?; tail -c 11000 .gpu/run.log; "
       "exit $rc")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dest", type=Path, default=REPO / ".gpu", help="ignored folder for the parts")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "Dataset004_Hippocampus",
                   help="the raw dataset folder packed into the data tar")
    p.add_argument("--tree", type=float, default=4.0, help="MiB left for the working tree in every command")
    p.add_argument("--limit", type=float, help="MiB per part (default: 64 MiB - --tree)")
    p.add_argument("--plan-only", action="store_true", help="split what is in <dest>/wheels already, download nothing")
    return p.parse_args(argv)


def split(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Names of ``sizes`` in parts of at most ``limit`` bytes: first fit, largest first (ties by name)."""
    too_large = {name: size for name, size in sizes.items() if size > limit}
    if too_large:
        raise FastkdError("cannot travel in one command: " + ", ".join(
            f"{name} ({size / MiB:.1f} MiB)" for name, size in sorted(too_large.items()))
            + f" > the part limit {limit / MiB:.1f} MiB; raise --limit (at most 64 MiB - --tree) or pick another "
            "version of that package")
    parts: list[list[str]] = []
    room: list[int] = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        for i, left in enumerate(room):
            if sizes[name] <= left:
                parts[i].append(name)
                room[i] -= sizes[name]
                break
        else:
            parts.append([name])
            room.append(limit - sizes[name])
    return parts


def place_data(parts: list[list[str]], sizes: dict[str, int], data: str, data_size: int, limit: int) -> list[list[str]]:
    """``parts`` with the data added to the smallest part where it fits, else as a part of its own; the part with
    the data comes last (its command runs the driver once every wheel is in)."""
    if data_size > limit:
        raise FastkdError(f"{data} ({data_size / MiB:.1f} MiB) > the part limit {limit / MiB:.1f} MiB")
    totals = [sum(sizes[n] for n in part) for part in parts]
    smallest = min(range(len(parts)), key=lambda i: totals[i], default=None)
    if smallest is not None and totals[smallest] + data_size <= limit:  # last: its command runs the driver
        return [part for i, part in enumerate(parts) if i != smallest] + [parts[smallest] + [data]]
    return parts + [[data]]


def commands(parts: list[list[str]], data: str) -> list[dict]:
    """The command that installs each part on the GPU machine; the part with the data also runs the driver, so
    it must be the last part sent (:func:`place_data` puts it last or with the smallest part: send that last)."""
    out = []
    for i, part in enumerate(parts, 1):
        steps, folder = [], f".gpu/part{i}"
        if any(n.endswith(".whl") for n in part):
            steps.append(f"{PYTHON} -m pip install -q --no-index --no-deps --no-compile --target .gpu/site {folder}/*.whl")
        if data in part:
            steps.append(f"mkdir -p .gpu/data && tar -xf {folder}/{data} -C .gpu/data")
        command = " && ".join(steps + ["ls .gpu/site | wc -l"])
        if data in part:  # the last wheels are in: run
            command = " && ".join(steps) + " && " + RUN
        out.append({"part": folder, "carry": [folder], "command": command})
    return out


def download(dest: Path) -> None:
    binary = [req for req, how in PACKAGES if how == "binary"]
    build = [req for req, how in PACKAGES if how == "build"]
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platforms, "-d", str(dest), *binary], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dest), *build], check=True)
    foreign = [p.name for p in dest.glob("*.whl") if not (p.name.endswith("-py3-none-any.whl") or (
        ("-cp312-" in p.name or "-abi3-" in p.name) and p.name.endswith("x86_64.whl")))]
    if foreign:
        raise FastkdError(f"wheels that do not install on CPython 3.12 x86-64: {foreign}")


def pack_data(raw: Path, tar: Path) -> None:
    if not (raw / "dataset.json").is_file():
        raise FastkdError(f"--data {raw}: no dataset.json (expected ../shared/datasets/Dataset004_Hippocampus)")
    with tarfile.open(tar, "w") as t:
        t.add(raw, arcname=raw.name)


def main(argv=None) -> int:
    args = parse_args(argv)
    limit = int((args.limit or 64 - args.tree) * MiB)
    if limit + args.tree * MiB > COMMAND_BYTES:
        raise FastkdError(f"--limit {limit / MiB:.1f} MiB + --tree {args.tree} MiB > the 64 MiB one command takes")
    wheels = args.dest / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not args.plan_only:
        download(wheels)
        pack_data(args.data, wheels / DATA)
    sizes = {p.name: p.stat().st_size for p in wheels.glob("*.whl")}
    parts = place_data(split(sizes, limit), sizes, DATA, (wheels / DATA).stat().st_size, limit)
    sizes[DATA] = (wheels / DATA).stat().st_size
    for i, part in enumerate(parts, 1):
        folder = args.dest / f"part{i}"
        folder.mkdir(exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        for name in part:
            (folder / name).hardlink_to(wheels / name)
    plan = [{**c, "files": {n: sizes[n] for n in part}, "bytes": sum(sizes[n] for n in part)}
            for c, part in zip(commands(parts, DATA), parts)]
    (args.dest / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    print(f"{len(sizes) - 1} wheels, {sum(sizes.values()) / MiB:.1f} MiB with the data; part limit {limit / MiB:.1f} MiB")
    for p in plan:
        print(f"\n{p['part']}: {p['bytes'] / MiB:.1f} MiB, carry {p['carry']}")
        for name, size in sorted(p["files"].items(), key=lambda kv: -kv[1]):
            print(f"  {size / MiB:7.2f} MiB  {name}")
        print(f"  command: {p['command']}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FastkdError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
