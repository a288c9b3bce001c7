"""The soft-label cache format on synthetic data: quantisation, atomic writes, reader, verify, tensorstore.

Real teachers filling a cache through Snakemake are in tests/workflow/test_softlabel_jobs.py.
"""

import json
import os
import socket
import subprocess

import numpy as np
import pytest

from fastkd import cache
from fastkd.cache import CacheError, SoftLabelCache
from fastkd.softlabels import shard_cases
from fake_stores import flip_a_byte, make_store, provenance, softmax
from workflow_runs import BIN


@pytest.mark.parametrize("channels", [2, 3, 5, 14])
def test_uint8_quantisation_keeps_sums_at_one_and_error_below_one_step(channels):
    rng = np.random.default_rng(channels)
    p = softmax(rng.normal(scale=4, size=(channels, 20, 30, 10)))
    q = cache.encode(p, "uint8")
    assert q.dtype == np.uint8
    assert (q.sum(axis=0, dtype=np.int32) == 255).all()
    decoded = q.astype(np.float32) / 255
    assert np.abs(decoded - p).max() < 1 / 255
    assert np.abs(decoded.sum(axis=0) - 1).max() < 1e-5


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("mass", [1 - 2e-3, 1.0, 1 + 2e-3])
@pytest.mark.parametrize("classes", [119, 300])
def test_uint8_quantisation_at_many_classes_is_largest_remainder(classes, mass, ties, threads, monkeypatch):
    """119 and 300 classes (the bisected path, counts in uint8 and uint16), most absent (probability
    exactly 0) in most voxels as confident teachers give them, sums off by a float error or two, exact ties: the same as sorting every voxel,
    on one thread and on three (each a slab of the voxels)."""
    monkeypatch.setattr("fastkd.cache.codec._threads", lambda: threads)
    rng = np.random.default_rng(7)
    p = softmax(rng.normal(scale=4, size=(classes, 12, 10, 8)))
    p[1:][rng.random(p[1:].shape) < 0.8] = 0
    if ties:
        p[:, :6] = np.where(p[:, :6] > 0, 1.0, 0.0)  # equal probabilities among the present classes
    p = (p / p.sum(axis=0)).astype(np.float32) * np.float32(mass)
    q = cache.encode(p, "uint8")
    scaled = np.clip(p, 0, 1) * np.float32(255)
    floor = np.floor(scaled)
    deficit = np.clip(np.rint(255 - floor.sum(axis=0)), 0, classes)
    order = np.argsort(-(scaled - floor), axis=0, kind="stable")  # one stable sort per voxel
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(classes).reshape(-1, 1, 1, 1), axis=0)
    reference = floor + (ranks < deficit)
    np.testing.assert_array_equal(q, reference.astype(np.uint8))
    assert (q.sum(axis=0, dtype=np.int32) == 255).all()
    assert (q[p == 0] == 0).all()  # the loader's present-class test relies on it
    assert np.abs(q.astype(np.float32) / 255 - p).max() < 1 / 255


def test_a_child_forked_after_encoding_encodes_too():
    """The encoder runs on the job's threads; a child forked afterwards (nnU-Net's workers, duplicate
    writers) must not hang (as GNU OpenMP does after a parallel region) and encodes the same."""
    import multiprocessing

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # encoding on 2 threads, as in a soft-label job with --threads 2
    try:
        p = softmax(np.random.default_rng(3).normal(scale=3, size=(119, 24, 20, 18))).astype(np.float32)
        expected = cache.encode(p, "uint8")
        child = multiprocessing.get_context("fork").Process(
            target=lambda: os._exit(0 if np.array_equal(cache.encode(p, "uint8"), expected) else 3))
        child.start()
        child.join(60)
        if child.exitcode is None:
            child.kill()
        assert child.exitcode == 0, "the forked child hung (killed after 60 s) or encoded differently"
    finally:
        torch.set_num_threads(threads)


def test_uint8_sigmoid_rounding_and_float16_round_trip():
    rng = np.random.default_rng(1)
    p = rng.random((2, 9, 9, 9), dtype=np.float32)
    assert np.abs(cache.encode(p, "uint8", softmax=False) / 255 - p).max() <= 0.5 / 255 + 1e-7
    half = cache.encode(p, "float16")
    assert half.dtype == np.float16 and np.abs(half.astype(np.float32) - p).max() <= 2 ** -11


def test_chunks_follow_the_patch_and_hold_every_class():
    assert cache.chunk_shape((3, 100, 90, 20), [40, 56, 40]) == (3, 40, 56, 20)
    assert cache.chunk_shape((4, 30, 200, 200), [128, 128]) == (4, 1, 128, 128)  # 2d: one slice per chunk


def test_read_crop_pads_with_zeros_and_marks_valid_voxels(tmp_path):
    store, probs = make_store(tmp_path)
    reader = SoftLabelCache(store)
    full = reader.read("case_a")
    assert full.dtype == np.float32 and full.shape == (3, 10, 12, 9)
    assert np.abs(full - probs["case_a"]).max() < 1 / 255
    box = [[-3, 5], [4, 16], [2, 9]]  # reaches outside along x (before) and y (after)
    crop = reader.read_crop("case_a", box)
    assert crop.shape == (4, 8, 12, 7) and crop.dtype == np.float32
    np.testing.assert_array_equal(crop[:3, 3:, :8, :], full[:, 0:5, 4:12, 2:9])
    assert (crop[:3, :3] == 0).all() and (crop[:3, :, 8:] == 0).all()
    valid = np.zeros((8, 12, 7), np.float32)
    valid[3:, :8, :] = 1
    np.testing.assert_array_equal(crop[3], valid)
    assert (reader.read_crop("case_a", [[20, 24], [0, 2], [0, 2]]) == 0).all()  # entirely outside


def sparse_store(tmp_path, dtype, n_classes=7, shape=(13, 11, 10)):
    """A store of many small chunks (patch 4^3) whose classes each live in one region, as organs do:
    a crop holds some of them. Returns (store, reader)."""
    rng = np.random.default_rng(1)
    centres = rng.integers(0, shape, size=(n_classes, 3))
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    logits = np.stack([-((grid - c[:, None, None, None]) ** 2).sum(0) / 4.0 for c in centres])
    p = softmax(logits * 3)
    p[p < 0.02] = 0  # far from its centre a class is exactly 0
    p /= p.sum(0, keepdims=True)
    names = [f"c{i}" for i in range(n_classes)]
    store = tmp_path / f"sparse_{dtype}.zarr"
    cache.write_case(store, "case_a", p.astype(np.float32), provenance(dtype, channels=names, patch=(4, 4, 4)))
    cache.finalize(store, {"case_a": [1, *shape]})
    return store, SoftLabelCache(store)


CROPS = [[[0, 13], [0, 11], [0, 10]], [[-3, 5], [4, 16], [2, 9]], [[5, 9], [1, 6], [3, 10]],
         [[6, 7], [7, 8], [0, 1]], [[-4, 20], [-2, 13], [-1, 11]], [[20, 24], [0, 2], [0, 2]]]


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_read_crop_classes_is_read_crop_at_the_present_classes(tmp_path, dtype, monkeypatch):
    store, reader = sparse_store(tmp_path, dtype)
    assert len(list((store / "case_a" / "c").rglob("*/*/*/*"))) == 4 * 3 * 3  # the crops span several chunks
    counts = set()
    for box in CROPS:
        full = reader.read_crop("case_a", box)[:-1]
        present = np.union1d([0], np.flatnonzero(full.reshape(len(full), -1).max(1) > 0))
        values, classes, rest = reader.read_crop_classes("case_a", box)
        assert rest is None and values.dtype == np.float32 and classes.dtype == np.int64
        np.testing.assert_array_equal(classes, present)
        np.testing.assert_array_equal(values, full[classes])  # bit-identical, zero outside the volume
        counts.add(len(classes))
    assert len(counts) > 2  # crops with few and with many of the 7 classes
    # the direct chunk reader and zarr's own pipeline agree exactly (the latter reads any other layout)
    direct = [(reader.read_crop("case_a", b), *reader.read_crop_classes("case_a", b)[:2]) for b in CROPS]
    monkeypatch.setattr("fastkd.cache.reader._direct_layout", lambda array: None)
    through_zarr = SoftLabelCache(store)
    for box, (crop, values, classes) in zip(CROPS, direct):
        np.testing.assert_array_equal(through_zarr.read_crop("case_a", box), crop)
        got_values, got_classes, _ = through_zarr.read_crop_classes("case_a", box)
        np.testing.assert_array_equal(got_classes, classes)
        np.testing.assert_array_equal(got_values, values)


def test_the_direct_chunk_reader_refuses_a_chunk_damaged_after_opening(tmp_path):
    store, reader = sparse_store(tmp_path, "uint8")
    reader.read_crop_classes("case_a", CROPS[0])  # opened and checked: every chunk present
    chunk = store / "case_a" / "c" / "0" / "1" / "1" / "1"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"case case_a is corrupt \(ValueError: chunk c/0/1/1/1: stored and computed checksum"):
        reader.read_crop_classes("case_a", [[4, 8], [4, 8], [4, 8]])
    reader.read_crop_classes("case_a", [[0, 4], [0, 4], [0, 4]])  # another chunk still reads
    chunk.unlink()
    with pytest.raises(CacheError, match=r"case case_a is corrupt \(FileNotFoundError"):
        reader.read_crop("case_a", [[5, 6], [5, 6], [5, 6]])


def test_check_names_every_mismatch(tmp_path):
    store, _ = make_store(tmp_path)
    reader = SoftLabelCache(store)
    reader.check(temperature=3.0, labels={"background": 0, "a": 1, "b": 2}, data_identifier="nnUNetPlans_3d_fullres",
                 shapes={"case_a": [1, 10, 12, 9]})
    with pytest.raises(CacheError) as info:
        reader.check(temperature=2.0, labels={"background": 0, "a": 1}, data_identifier="nnUNetPlans_2d",
                     shapes={"case_a": [1, 10, 12, 8], "case_z": [1, 4, 4, 4]})
    message = str(info.value)
    assert "temperature: the cache was made with T = 3.0, expected T = 2.0" in message
    assert "labels: the cache has" in message and "grid: the cache is on 'nnUNetPlans_3d_fullres'" in message
    assert "case case_a: cache shape [10, 12, 9] != preprocessed [10, 12, 8]" in message
    assert "case case_z: not in the cache" in message
    with pytest.raises(CacheError, match="case 'case_z' is not in the soft-label cache"):
        reader.read_crop("case_z", [[0, 1]] * 3)


def test_reader_refuses_an_unfinished_store_and_an_incomplete_case(tmp_path):
    store = tmp_path / "c.zarr"
    p = softmax(np.random.default_rng(0).normal(size=(3, 6, 6, 6)))
    cache.write_case(store, "case_a", p, provenance())
    with pytest.raises(CacheError, match=r"no root zarr.json \(1 case arrays present"):
        SoftLabelCache(store)
    with pytest.raises(CacheError, match=r"case_b: missing"):
        cache.finalize(store, {"case_a": [1, 6, 6, 6], "case_b": [1, 6, 6, 6]})
    assert not (store / "zarr.json").exists()

    cache.write_case(store, "case_b", p, provenance())
    cache.finalize(store, {"case_a": [1, 6, 6, 6], "case_b": [1, 6, 6, 6]})
    # a case whose completeness flag is false (as if its writer died before the flag) is refused
    meta = store / "case_b" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["fastkd_softlabels"]["complete"] = False
    meta.write_text(json.dumps(doc))
    reader = SoftLabelCache(store)
    reader.read_crop("case_a", [[0, 6]] * 3)
    with pytest.raises(CacheError, match="case case_b is incomplete"):
        reader.read_crop("case_b", [[0, 6]] * 3)
    assert not cache.is_current(store, "case_b", provenance(), (3, 6, 6, 6))
    assert cache.is_current(store, "case_a", provenance(), (3, 6, 6, 6))
    assert not cache.is_current(store, "case_a", provenance(temperature=2.0), (3, 6, 6, 6))
    with pytest.raises(CacheError, match="case_b: not marked complete"):
        cache.finalize(store, {"case_a": [1, 6, 6, 6], "case_b": [1, 6, 6, 6]})


def test_finalize_rejects_mixed_settings_and_wrong_shapes(tmp_path):
    store = tmp_path / "c.zarr"
    p = softmax(np.random.default_rng(0).normal(size=(3, 6, 6, 6)))
    cache.write_case(store, "case_a", p, provenance())
    cache.write_case(store, "case_b", p, provenance(temperature=1.0))
    with pytest.raises(CacheError) as info:
        cache.finalize(store, {"case_a": [1, 6, 6, 6], "case_b": [1, 6, 6, 6], "case_c": [1, 6, 6, 6]})
    message = str(info.value)
    assert "case_b: written with other settings than case_a (temperature differ)" in message
    assert "case_c: missing" in message
    with pytest.raises(CacheError, match=r"case_a: shape \[3, 6, 6, 6\] does not match the preprocessed case \[1, 6, 6, 7\]"):
        cache.finalize(store, {"case_a": [1, 6, 6, 7]})


def test_rewriting_a_case_replaces_it_atomically(tmp_path):
    store, _ = make_store(tmp_path)
    new = softmax(np.random.default_rng(5).normal(size=(3, 10, 12, 9)))
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=60)  # a finished process: its pid is not alive (a killed writer's)
    host = socket.gethostname().replace(".", "_")
    (cache.partial_dir(store) / f"case_a.w{dead.pid}@{host}.0123abcd").mkdir(parents=True)
    cache.write_case(store, "case_a", new, provenance())
    assert list(cache.partial_dir(store).iterdir()) == []
    cache.finalize(store, {"case_a": [1, 10, 12, 9], "case_b": [1, 7, 5, 11]})
    assert not cache.partial_dir(store).exists()
    assert np.abs(SoftLabelCache(store).read("case_a") - new).max() < 1 / 255


def test_a_flipped_byte_fails_verify_and_the_reader_naming_the_case(tmp_path):
    store, _ = make_store(tmp_path)
    assert cache.verify(store, preprocessed_folder=tmp_path) == [
        f"case_a: no preprocessed {tmp_path}/case_a.b2nd", f"case_b: no preprocessed {tmp_path}/case_b.b2nd"]
    flip_a_byte(store, "case_b")
    problems = cache.verify(store, preprocessed_folder=tmp_path)
    assert any(p.startswith("case_b: unreadable") and "checksum" in p for p in problems), problems
    assert not any(p.startswith("case_a: unreadable") for p in problems)
    with pytest.raises(CacheError, match=r"case case_b is corrupt .*checksum"):
        SoftLabelCache(store).read_crop("case_b", [[0, 4]] * 3)

    run = subprocess.run([str(BIN / "fastkd"), "cache", "verify", str(store), "--preprocessed", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1
    assert "fastkd cache verify: error:" in run.stderr and "case_b: unreadable" in run.stderr


def test_verify_checks_sums_and_preprocessed_shapes(tmp_path):
    import blosc2

    store, _ = make_store(tmp_path, dtype="float16")
    folder = tmp_path / "nnUNetPlans_3d_fullres"
    folder.mkdir()
    blosc2.asarray(np.zeros((1, 10, 12, 9), np.float32), urlpath=str(folder / "case_a.b2nd"), mode="w")
    blosc2.asarray(np.zeros((1, 7, 5, 12), np.float32), urlpath=str(folder / "case_b.b2nd"), mode="w")
    assert cache.verify(store, folder) == ["case_b: shape [7, 5, 11] != preprocessed [7, 5, 12]"]

    import zarr

    array = zarr.open_array(str(store / "case_a"), mode="r+")
    array[0, 0, 0, :3] = np.float16(0.9)  # three voxels no longer sum to one
    array[1, 1, 1, 1] = np.float16(np.nan)
    problems = cache.verify(store, folder)
    assert "case_a: 1 non-finite values" in problems
    array[1, 1, 1, 1] = np.float16(0)
    assert "case_a: 4 voxels whose probabilities do not sum to 1" in cache.verify(store, folder)


def test_tensorstore_reads_the_store_bit_identically(tmp_path):
    import tensorstore as ts
    import zarr

    for dtype in ("uint8", "float16"):
        store, _ = make_store(tmp_path, dtype=dtype, name=f"{dtype}.zarr")
        for case in ("case_a", "case_b"):
            ours = zarr.open_array(str(store / case), mode="r")[...]
            theirs = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / case)}}).result()
            got = theirs.read().result()
            assert got.dtype == ours.dtype and got.shape == ours.shape
            assert got.tobytes() == ours.tobytes()


def test_info_reports_size_compression_and_provenance(tmp_path):
    store, _ = make_store(tmp_path)
    report = cache.info(store)
    assert report["complete"] and report["n_cases"] == 2 and report["expected_cases"] == 2
    assert report["logical_bytes"] == 3 * (10 * 12 * 9 + 7 * 5 * 11)
    assert report["float32_bytes"] == 4 * report["logical_bytes"]
    assert report["bytes"] > 0 and report["teacher_forwards"] == 16
    run = subprocess.run([str(BIN / "fastkd"), "cache", "info", str(store), "--cases"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "complete:      yes" in run.stdout and "case_b" in run.stdout and "uint8" in run.stdout

    (store / "zarr.json").unlink()
    assert not cache.info(store)["complete"]
    run = subprocess.run([str(BIN / "fastkd"), "cache", "info", str(tmp_path / "nope.zarr")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 1 and "nope.zarr does not exist" in run.stderr


@pytest.mark.parametrize("n_cases,n_shards", [(1, 1), (5, 2), (12, 5), (200, 7), (13, 13)])
def test_shards_cover_every_case_exactly_once(n_cases, n_shards):
    cases = [f"c{i:03d}" for i in range(n_cases)][::-1]
    shards = [shard_cases(cases, n_shards, s) for s in range(n_shards)]
    flat = [c for shard in shards for c in shard]
    assert sorted(flat) == sorted(cases) and len(flat) == len(set(flat))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_arguments_are_checked():
    with pytest.raises(Exception, match=r"softlabels.shards = 3: must be between 1 and the number of cases \(2\)"):
        shard_cases(["a", "b"], 3, 0)
    with pytest.raises(Exception, match=r"shard = 2: must be between 0 and 1"):
        shard_cases(["a", "b"], 2, 2)


def test_region_based_soft_labels_are_rounded_per_channel_and_not_summed(tmp_path):
    store = tmp_path / "regions.zarr"
    p = np.random.default_rng(3).random((2, 6, 7, 8), dtype=np.float32)  # independent sigmoid channels
    prov = provenance(activation="sigmoid", channels=("region0:[1, 2]", "region1:[2]"))
    cache.write_case(store, "case_a", p, prov)
    cache.finalize(store, {"case_a": [1, 6, 7, 8]})
    assert np.abs(SoftLabelCache(store).read("case_a") - p).max() <= 0.5 / 255 + 1e-6
    assert cache.verify(store, tmp_path) == [f"case_a: no preprocessed {tmp_path}/case_a.b2nd"]


def test_softlabels_command_names_bad_inputs_and_writes_nothing(tmp_path):
    manifest = tmp_path / "pm.json"
    manifest.write_text("{not json")
    store = tmp_path / "c.zarr"
    base = [str(BIN / "fastkd"), "softlabels", "fill", "-o", str(store)]
    run = subprocess.run(base + ["-t", str(tmp_path / "teachers.json"), "-m", str(manifest)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 1 and f"preprocess manifest {manifest} is not valid JSON" in run.stderr
    manifest.write_text("{}")
    run = subprocess.run(base + ["-t", str(tmp_path / "teachers.json"), "-m", str(manifest)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 1 and f"teacher manifest {tmp_path / 'teachers.json'} does not exist" in run.stderr
    run = subprocess.run(base + ["-t", "a", "-m", "b", "--shard", "3/2"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and "--shard: '3/2': need 1 <= I <= N" in run.stderr
    run = subprocess.run(base + ["-t", "a", "-m", "b", "-T", "0"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and "-T/--temperature: distillation.temperature = 0 (int): must be > 0" in run.stderr
    assert not store.exists()
