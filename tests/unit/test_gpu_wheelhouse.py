"""benchmarks/gpu/wheelhouse.py: how the wheels and the data are split into parts that each travel with one
command to the GPU machine (no network: the download itself runs only in the README's step)."""

import importlib.util
from pathlib import Path

import pytest

from fastkd.errors import FastkdError

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("wheelhouse", REPO / "benchmarks" / "gpu" / "wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wheelhouse)
MiB = wheelhouse.MiB


def test_split_first_fit_largest_first_keeps_every_part_under_the_limit():
    sizes = {"simpleitk.whl": 50 * MiB, "numcodecs.whl": 9 * MiB, "blosc2.whl": 8 * MiB, "cc3d.whl": 5 * MiB,
             "nibabel.whl": 3 * MiB, "zarr.whl": MiB // 3, "yacs.whl": MiB // 50}
    parts = wheelhouse.split(sizes, 60 * MiB)
    assert parts == [["simpleitk.whl", "numcodecs.whl", "zarr.whl", "yacs.whl"], ["blosc2.whl", "cc3d.whl", "nibabel.whl"]]
    assert sorted(n for p in parts for n in p) == sorted(sizes)
    assert all(sum(sizes[n] for n in p) <= 60 * MiB for p in parts)


def test_split_is_exact_at_the_limit_and_refuses_a_larger_wheel_by_name():
    assert wheelhouse.split({"a.whl": 10, "b.whl": 10}, 20) == [["a.whl", "b.whl"]]
    assert wheelhouse.split({"a.whl": 10, "b.whl": 11}, 20) == [["b.whl"], ["a.whl"]]
    with pytest.raises(FastkdError, match=r"simpleitk-2.5.7.whl \(50.3 MiB\) > the part limit 40.0 MiB"):
        wheelhouse.split({"simpleitk-2.5.7.whl": int(50.3 * MiB), "zarr.whl": MiB}, 40 * MiB)


def test_data_joins_the_smallest_part_where_it_fits_else_travels_alone():
    sizes = {"big.whl": 50 * MiB, "small.whl": 20 * MiB}
    parts = [["big.whl"], ["small.whl"]]
    assert wheelhouse.place_data(parts, sizes, "data.tar", 16 * MiB, 60 * MiB) == [["big.whl"], ["small.whl", "data.tar"]]
    assert wheelhouse.place_data(parts, sizes, "data.tar", 45 * MiB, 60 * MiB) == [["big.whl"], ["small.whl"],
                                                                                   ["data.tar"]]
    assert wheelhouse.place_data(parts[::-1], sizes, "data.tar", 16 * MiB, 60 * MiB) == [["big.whl"],
                                                                                         ["small.whl", "data.tar"]]
    assert wheelhouse.place_data([], {}, "data.tar", MiB, 60 * MiB) == [["data.tar"]]
    with pytest.raises(FastkdError, match="data.tar"):
        wheelhouse.place_data(parts, sizes, "data.tar", 61 * MiB, 60 * MiB)


def test_commands_install_each_part_into_the_ignored_site_and_unpack_the_data():
    cmds = wheelhouse.commands([["a.whl"], ["b.whl", "Dataset004_Hippocampus.tar"]], "Dataset004_Hippocampus.tar")
    assert [c["carry"] for c in cmds] == [[".gpu/part1"], [".gpu/part2"]]
    assert cmds[0]["command"].startswith("/opt/torch/.venv/bin/python3 -m pip install -q --no-index --no-deps "
                                         "--no-compile --target .gpu/site .gpu/part1/*.whl")
    assert "tar -xf .gpu/part2/Dataset004_Hippocampus.tar -C .gpu/data" in cmds[1]["command"]
    assert "tar -xf" not in cmds[0]["command"] and "run.py" not in cmds[0]["command"]
    assert "benchmarks/gpu/run.py --raw .gpu/data/Dataset004_Hippocampus" in cmds[1]["command"]
    assert "--device cuda" in cmds[1]["command"] and cmds[1]["command"].endswith("exit $rc")
    assert all(len(c["command"]) < 2000 for c in cmds)


def test_plan_only_splits_the_wheels_on_disk(tmp_path, capsys):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name, size in (("big-1-py3-none-any.whl", 3 * MiB), ("small-1-py3-none-any.whl", MiB)):
        (wheels / name).write_bytes(b"\0" * size)
    (wheels / wheelhouse.DATA).write_bytes(b"\0" * (2 * MiB))
    assert wheelhouse.main(["--dest", str(tmp_path), "--plan-only", "--limit", "4", "--tree", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "part1").iterdir()) == ["big-1-py3-none-any.whl", "small-1-py3-none-any.whl"]
    assert sorted(p.name for p in (tmp_path / "part2").iterdir()) == [wheelhouse.DATA]
    out = capsys.readouterr().out
    assert ".gpu/part1: 4.0 MiB" in out and ".gpu/part2: 2.0 MiB" in out
    with pytest.raises(FastkdError, match="64 MiB"):
        wheelhouse.main(["--dest", str(tmp_path), "--plan-only", "--limit", "62", "--tree", "4"])


def test_the_readme_sends_the_commands_the_plan_prints():
    readme = (REPO / "benchmarks" / "gpu" / "README.md").read_text()
    data = wheelhouse.DATA
    for c in wheelhouse.commands([["simpleitk.whl"], ["blosc2.whl", data]], data):
        assert c["command"] in readme, c["command"]
