"""Nothing silently wrong in the soft-label cache: missing chunks, concurrent and killed writers, a
failing finalize, stale preprocessed inputs, bounded chunks and bounded encoding memory, and the fold
mean of probabilities (not logits). Synthetic data; real teachers are in tests/workflow/test_softlabel_jobs.py.
"""

import json
import multiprocessing
import socket
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastkd import cache
from fastkd.cache import CacheError, SoftLabelCache
from fastkd.errors import FastkdError
from fastkd.softlabels import TeacherEnsemble
from fake_stores import make_store, provenance, softmax


def delete_a_chunk(store: Path, case: str) -> Path:
    chunk = sorted(p for p in (store / case / "c").rglob("*") if p.is_file())[-1]
    chunk.unlink()
    return chunk


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_a_deleted_chunk_fails_verify_reader_and_finalize_naming_the_case(tmp_path, activation):
    rng = np.random.default_rng(0)
    store, shapes = tmp_path / "c.zarr", {"case_a": (20, 12, 9), "case_b": (7, 5, 11)}
    for case, shape in shapes.items():
        p = softmax(rng.normal(size=(3, *shape))) if activation == "softmax" else rng.random((3, *shape), np.float32)
        # all zero (sigmoid: in no region) in some chunks: zarr skips writing chunks equal to the fill value
        # unless told to write empty chunks, and a skipped chunk could not be told from a lost one
        p[:, 8:] = 0
        p[0, 8:] = 1 if activation == "softmax" else 0
        cache.write_case(store, case, p, provenance(activation=activation, patch=(8, 8, 8)))
    assert len(list((store / "case_a" / "c").rglob("*/*/*/*"))) == 3 * 2 * 2  # every chunk, zeros too
    expected = {c: [1, *s] for c, s in shapes.items()}
    cache.finalize(store, expected)
    assert cache.verify(store, preprocessed_folder=tmp_path) == [
        f"{c}: no preprocessed {tmp_path}/{c}.b2nd" for c in shapes]

    delete_a_chunk(store, "case_a")  # zarr would read it as zeros: probability 0 for every class
    problems = cache.verify(store, preprocessed_folder=tmp_path)
    assert any(p.startswith("case_a: 1 of 12 chunks missing") for p in problems), problems
    assert not any(p.startswith("case_b: 1") for p in problems)
    with pytest.raises(CacheError, match=r"case case_a: 1 of 12 chunks missing \(e.g. c/0/2/1/1\)"):
        SoftLabelCache(store).read_crop("case_a", [[0, 4]] * 3)  # even a crop away from the hole
    SoftLabelCache(store).read_crop("case_b", [[0, 4]] * 3)
    assert not cache.is_current(store, "case_a", provenance(activation=activation), (3, 20, 12, 9))
    with pytest.raises(CacheError, match=r"case_a: 1 of 12 chunks missing"):
        cache.finalize(store, expected)
    run = subprocess.run([sys.executable, "-m", "fastkd", "cache", "verify", str(store), "--preprocessed",
                          str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 1 and "case_a: 1 of 12 chunks missing" in run.stderr


def test_a_failing_finalize_leaves_a_complete_store_complete(tmp_path):
    store, probs = make_store(tmp_path)
    root = (store / "zarr.json").read_text()
    with pytest.raises(CacheError, match="case_c: missing"):
        cache.finalize(store, {"case_a": [1, 10, 12, 9], "case_b": [1, 7, 5, 11], "case_c": [1, 4, 4, 4]})
    assert (store / "zarr.json").read_text() == root
    assert np.abs(SoftLabelCache(store).read("case_b") - probs["case_b"]).max() < 1 / 255


def test_a_live_writers_partial_folder_is_never_removed(tmp_path):
    store, _ = make_store(tmp_path)
    host = socket.gethostname().replace(".", "_")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = cache.partial_dir(store) / f"case_a.w{live.pid}@{host}.0123abcd"  # a duplicate job, still writing
        elsewhere = cache.partial_dir(store) / "case_a.w1@another_host.89abcdef"  # cannot be checked: kept
        for folder in (theirs, elsewhere):
            (folder / "c").mkdir(parents=True)
            (folder / "c" / "data").write_bytes(b"being written")
        cache.write_case(store, "case_a", softmax(np.ones((3, 10, 12, 9))), provenance())
        cache.finalize(store, {"case_a": [1, 10, 12, 9], "case_b": [1, 7, 5, 11]})
        assert (theirs / "c" / "data").read_bytes() == b"being written"
        assert (elsewhere / "c" / "data").read_bytes() == b"being written"
    finally:
        live.kill()
        live.wait(timeout=60)
    cache.write_case(store, "case_a", softmax(np.ones((3, 10, 12, 9))), provenance())
    assert not theirs.exists() and elsewhere.exists()  # its writer is dead now


def _write_many(store, case, seed, rounds):
    for i in range(rounds):
        p = softmax(np.random.default_rng([seed, i]).normal(size=(3, 24, 20, 18)))
        cache.write_case(store, case, p, provenance(patch=(8, 8, 8)), {"writer": seed, "round": i})


def test_two_concurrent_writers_of_one_case_both_finish_and_leave_a_whole_case(tmp_path):
    store = tmp_path / "c.zarr"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_write_many, args=(store, "case_a", seed, 6)) for seed in (1, 2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
    assert [w.exitcode for w in writers] == [0, 0]
    cache.finalize(store, {"case_a": [1, 24, 20, 18]})
    attrs = cache.case_attrs(store, "case_a")
    expected = softmax(np.random.default_rng([attrs["writer"], attrs["round"]]).normal(size=(3, 24, 20, 18)))
    assert np.abs(SoftLabelCache(store).read("case_a") - expected).max() < 1 / 255
    assert cache.verify(store, preprocessed_folder=tmp_path) == [f"case_a: no preprocessed {tmp_path}/case_a.b2nd"]
    assert not cache.partial_dir(store).exists()


KILLER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from fastkd import cache
    from fastkd.cache import codec, writer
    from fake_stores import provenance, softmax

    store, where = sys.argv[1], sys.argv[2]
    codec.BLOCK_VALUES = 3 * 8 * 8 * 8  # one chunk per block: several blocks
    calls = {{"n": 0}}
    if where == "encode":  # killed half-way through the chunks
        encode = writer.encode
        def dying_encode(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return encode(*args, **kwargs)
        writer.encode = dying_encode
    else:  # killed between moving the old version aside and renaming the new one in
        rename = os.rename
        def dying_rename(src, dst):
            rename(src, dst)
            if str(src).endswith("/case_a") and ".partial" in str(dst):
                os.kill(os.getpid(), signal.SIGKILL)
        os.rename = dying_rename
    cache.invalidate(store)
    p = softmax(np.random.default_rng(9).normal(size=(3, 10, 12, 9)))
    cache.write_case(store, "case_a", p, provenance(temperature=2.0), {{"writer": "killed"}})
""")


@pytest.mark.parametrize("where", ["encode", "rename"])
def test_sigkill_inside_write_case_is_recomputed_and_never_read(tmp_path, where):
    store, probs = make_store(tmp_path)
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(tests=str(Path(__file__).parents[2])))
    run = subprocess.run([sys.executable, str(script), str(store), where], capture_output=True, text=True, timeout=600)
    assert run.returncode == -9, run.stderr
    # the dead writer's folder (and, killed while renaming, the old version it had moved aside)
    assert len(list(cache.partial_dir(store).iterdir())) == (1 if where == "encode" else 2)
    with pytest.raises(CacheError, match="no root zarr.json"):
        SoftLabelCache(store)
    new = provenance(temperature=2.0)
    assert not cache.is_current(store, "case_a", new, (3, 10, 12, 9))  # the rerun recomputes it
    if where == "rename":
        with pytest.raises(CacheError, match="case_a: missing"):
            cache.finalize(store, {"case_a": [1, 10, 12, 9]})
    else:  # the old version is untouched and was never marked with the new settings
        assert cache.case_attrs(store, "case_a")["provenance"]["temperature"] == 3.0
    p = softmax(np.random.default_rng(9).normal(size=(3, 10, 12, 9)))
    cache.write_case(store, "case_a", p, new)
    cache.write_case(store, "case_b", probs["case_b"], new)
    cache.finalize(store, {"case_a": [1, 10, 12, 9], "case_b": [1, 7, 5, 11]})
    assert not cache.partial_dir(store).exists()
    assert np.abs(SoftLabelCache(store).read("case_a") - p).max() < 1 / 255


def test_a_re_preprocessed_case_is_no_longer_current(tmp_path):
    import blosc2

    folder = tmp_path / "nnUNetPlans_3d_fullres"
    folder.mkdir()
    blosc2.asarray(np.zeros((1, 6, 6, 6), np.float32), urlpath=str(folder / "case_a.b2nd"), mode="w")
    store, p = tmp_path / "c.zarr", softmax(np.random.default_rng(0).normal(size=(3, 6, 6, 6)))
    before = cache.fingerprint(folder, "case_a")
    cache.write_case(store, "case_a", p, provenance(), {"preprocessed_sha256": before})
    cache.finalize(store, {"case_a": [1, 6, 6, 6]}, folder)
    assert cache.is_current(store, "case_a", provenance(), (3, 6, 6, 6), before)
    assert cache.verify(store) == []

    blosc2.asarray(np.ones((1, 6, 6, 6), np.float32), urlpath=str(folder / "case_a.b2nd"), mode="w")  # re-preprocessed
    after = cache.fingerprint(folder, "case_a")
    assert after != before
    assert not cache.is_current(store, "case_a", provenance(), (3, 6, 6, 6), after)
    assert cache.verify(store) == ["case_a: the preprocessed case changed since its soft labels were made "
                                   "(sha256 of case_a.b2nd differs); rerun its soft-label job"]


@pytest.mark.parametrize("classes,patch,itemsize", [(3, [40, 56, 40], 1), (16, [128, 128, 128], 1),
                                                    (118, [128, 128, 128], 1), (118, [160, 192, 64], 2),
                                                    (105, [512, 512], 1)])
def test_chunks_are_bounded_in_bytes_and_keep_the_patch_proportions(classes, patch, itemsize):
    spatial = (500, 500, 300) if len(patch) == 3 else (300, 512, 512)
    chunks = cache.chunk_shape((classes, *spatial), patch, itemsize)
    assert chunks[0] == classes  # every class of a voxel in one chunk
    assert cache.CHUNK_BYTES / 2 < np.prod(chunks) * itemsize <= cache.CHUNK_BYTES or chunks[1:] == tuple(
        p if len(patch) == 3 else q for p, q in zip(patch, [1, *patch]))
    full = patch if len(patch) == 3 else [1, *patch]
    ratios = [c / p for c, p in zip(chunks[1:], full) if p > 1]
    assert max(ratios) / min(ratios) < 1.25  # the same factor on every axis


def test_blocks_tile_the_array_chunk_aligned_and_bounded():
    shape, chunks = (5, 23, 17, 30), (5, 4, 4, 8)
    seen = np.zeros(shape, np.int32)
    for box in cache.blocks(shape, chunks, max_values=5 * 4 * 4 * 8 * 3):
        assert np.prod([s.stop - s.start for s in box]) <= 5 * 4 * 4 * 8 * 3
        assert all(s.start % c == 0 for s, c in zip(box, chunks))
        seen[box] += 1
    assert (seen == 1).all()


def test_encoding_memory_is_bounded_whatever_the_case_size(tmp_path, monkeypatch):
    """100 classes: encoding the whole case at once takes ~29 bytes per value (argsort in int64)."""
    probs = softmax(np.random.default_rng(0).normal(size=(100, 40, 48, 48)))  # 37 MB of float32
    monkeypatch.setattr("fastkd.cache.codec.BLOCK_VALUES", 4 * 100 * 8 * 8 * 16)  # 4 chunks, 0.4 M values per block
    labels = {f"c{i}": i for i in range(100)}
    prov = {**provenance(channels=list(labels), patch=(8, 8, 16)), "labels": labels}
    tracemalloc.start()
    try:
        cache.write_case(tmp_path / "c.zarr", "case_a", probs, prov)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * probs.nbytes, f"peak {peak / 1e6:.1f} MB while writing {probs.nbytes / 1e6:.1f} MB of float32"
    cache.finalize(tmp_path / "c.zarr", {"case_a": [1, 40, 48, 48]})
    back = SoftLabelCache(tmp_path / "c.zarr").read("case_a")
    assert np.abs(back - probs).max() <= 1 / 255 and (np.abs(back.sum(0) - 1) < 1e-4).all()


class FakePredictor:
    """nnU-Net's predictor as TeacherEnsemble uses it: returns its network's float16 logits."""

    def __init__(self, use_mirroring=False):
        self.network, self.use_mirroring, self.allowed_mirroring_axes = None, use_mirroring, (0, 1, 2)
        self.configuration_manager, self.tile_step_size = SimpleNamespace(patch_size=[8, 8, 8]), 0.5

    def predict_sliding_window_return_logits(self, x):
        return self.network(x)


def ensemble(folders: list[list], weights: list[float], softmax_=True) -> TeacherEnsemble:
    """A TeacherEnsemble of fake folds: per folder a list of logits arrays (one per fold)."""
    e = TeacherEnsemble.__new__(TeacherEnsemble)
    e.weights, e.names = weights, [f"teacher{i}" for i in range(len(folders))]
    e.members = [(FakePredictor(), [lambda x, a=a: torch.from_numpy(a).half() for a in folds],
                  [str(f) for f in range(len(folds))]) for folds in folders]
    e.label_manager = SimpleNamespace(has_regions=not softmax_)
    return e


def test_folds_and_weights_average_probabilities_not_logits(monkeypatch):
    rng = np.random.default_rng(3)
    logits = [[rng.normal(scale=4, size=(4, 9, 7, 5)).astype(np.float16).astype(np.float32) for _ in range(n)]
              for n in (2, 3)]
    weights, T = [1.0, 3.0], 2.0
    monkeypatch.setattr("fastkd.softlabels.SLAB_VALUES", 4 * 7 * 5 * 2)  # several slabs per case
    got = ensemble(logits, weights).predict(np.zeros((1, 9, 7, 5), np.float32), T)

    def sm(z):
        return softmax(z / T)

    by_hand = (1.0 * (sm(logits[0][0]) + sm(logits[0][1])) / 2
               + 3.0 * (sm(logits[1][0]) + sm(logits[1][1]) + sm(logits[1][2])) / 3) / 4.0
    assert np.abs(got - by_hand).max() < 1e-5
    averaged_logits = sm((1.0 * sum(logits[0]) / 2 + 3.0 * sum(logits[1]) / 3) / 4.0)
    assert np.abs(got - averaged_logits).max() > 1e-2  # what averaging logits would give instead
    # out-of-fold style selection: only fold 1 of the first folder
    one = ensemble(logits, weights).predict(np.zeros((1, 9, 7, 5), np.float32), T, folds=[["1"], []])
    assert np.abs(one - sm(logits[0][1])).max() < 1e-5
    regions = ensemble(logits, weights, softmax_=False).predict(np.zeros((1, 9, 7, 5), np.float32), T)
    sig = [[1 / (1 + np.exp(-z / T)) for z in f] for f in logits]
    assert np.abs(regions - (sum(sig[0]) / 2 + 3 * sum(sig[1]) / 3) / 4).max() < 1e-5


def test_non_finite_teacher_logits_are_an_error_naming_the_fold():
    bad = np.zeros((3, 6, 6, 6), np.float32)
    bad[1, 5, 2, 2] = np.nan
    with pytest.raises(FastkdError, match=r"teacher1 fold 0 produced non-finite logits \(NaN or inf\)"):
        ensemble([[np.zeros_like(bad)], [bad]], [1.0, 1.0]).predict(np.zeros((1, 6, 6, 6), np.float32), 1.0)


def test_mem_mb_comes_from_the_largest_case(tmp_path):
    from fastkd.softlabels import mem_mb, peak_memory_bytes

    manifest, dataset_json = tmp_path / "m.json", tmp_path / "dataset.json"
    manifest.write_text(json.dumps({"cases": {"small": {"shape": [1, 40, 40, 40]},
                                              "large": {"shape": [1, 512, 512, 300]}}}))
    dataset_json.write_text(json.dumps({"labels": {"background": 0, **{f"organ{i}": i for i in range(1, 16)}}}))
    assert mem_mb(manifest, dataset_json) == int(np.ceil(peak_memory_bytes(16, [1, 512, 512, 300]) * 1.2 / 1e6))
    assert 9000 < peak_memory_bytes(16, [1, 512, 512, 300]) / 1e6 < 30000
    dataset_json.write_text(json.dumps({"labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "active": 3},
                                        "regions_class_order": [1, 2, 3]}))
    assert mem_mb(manifest, dataset_json) == int(np.ceil(peak_memory_bytes(3, [1, 512, 512, 300]) * 1.2 / 1e6))
    assert mem_mb(manifest, dataset_json, device="cuda") < mem_mb(manifest, dataset_json)


# -- top-k soft labels ---------------------------------------------------------------------------
def peaked(n_classes: int, shape, seed=0, scale=6.0) -> np.ndarray:
    """Softmax maps with a few likely classes per voxel, as a teacher's are."""
    return softmax(np.random.default_rng(seed).normal(scale=scale, size=(n_classes, *shape)))


@pytest.mark.parametrize("n_classes,k", [(3, 1), (3, 2), (16, 4), (120, 2), (120, 8), (300, 4)])
def test_top_k_round_trip_is_bounded_by_the_dropped_mass(n_classes, k):
    p = peaked(n_classes, (6, 7, 5), seed=k)
    stored = cache.encode_top_k(p, k)
    assert stored.shape == (2, k, 6, 7, 5) and stored.dtype == (np.uint8 if n_classes <= 256 else np.uint16)
    prov = {"scale": 1 / 255, "top_k": k, "channels": [str(i) for i in range(n_classes)]}
    back = cache.decode(stored, prov)
    assert back.shape == p.shape and np.abs(back.sum(axis=0) - 1).max() < 1e-5
    top = np.sort(p, axis=0)[::-1][:k]
    assert (np.abs(stored[0] / 255 - top) <= 1 / 255 + 1e-6).all()  # the k largest, each within one step
    assert (np.diff(stored[0].astype(int), axis=0) <= 0).all()
    assert (np.take_along_axis(p, stored[1].astype(np.intp), 0) == top).all()  # and their classes
    dropped = 1 - stored[0].sum(axis=0) / 255
    assert (np.abs(back - p).max(axis=0) <= np.maximum(dropped, 0) + 1 / 255 + 1e-6).all()
    with pytest.raises(CacheError, match=rf"softlabels.top_k = {n_classes}: must be between 1 and"):
        cache.encode_top_k(p, n_classes)


def test_a_top_k_store_reads_dense_reports_and_verifies_its_dropped_mass(tmp_path):
    import zarr

    classes = [f"organ{i}" for i in range(40)]
    prov = {**provenance(channels=classes), "labels": {c: i for i, c in enumerate(classes)}, "top_k": 4}
    store, probs = tmp_path / "top4.zarr", {}
    for i, (case, shape) in enumerate({"case_a": (12, 10, 9), "case_b": (5, 7, 11)}.items()):
        probs[case] = peaked(40, shape, seed=i)
        cache.write_case(store, case, probs[case], prov)
    cache.finalize(store, {"case_a": [1, 12, 10, 9], "case_b": [1, 5, 7, 11]})
    reader = SoftLabelCache(store)
    assert reader.top_k == 4 and zarr.open_array(str(store / "case_a")).shape == (2, 4, 12, 10, 9)
    for case, p in probs.items():
        stored = cache.encode_top_k(p, 4)
        assert np.array_equal(reader.read(case), cache.decode(stored, prov))
    crop = reader.read_crop("case_a", [[-2, 6], [3, 10], [0, 9]])
    assert crop.shape == (41, 8, 7, 9) and (crop[:, :2] == 0).all() and (crop[40, 2:] == 1).all()
    assert np.array_equal(crop[:40, 2:], reader.read("case_a")[:, :6, 3:10])

    report = cache.info(store)
    drops = [cache.case_attrs(store, c)["top_k_dropped"] for c in probs]
    expected = {c: 1 - cache.encode_top_k(p, 4)[0].sum(0) / 255 for c, p in probs.items()}
    assert drops[0]["mean"] == pytest.approx(expected["case_a"].mean()) and drops[1]["max"] == pytest.approx(
        expected["case_b"].max())
    voxels = sum(e.size for e in expected.values())
    assert report["top_k_dropped"]["mean"] == pytest.approx(sum(e.sum() for e in expected.values()) / voxels)
    assert report["logical_bytes"] == 2 * 4 * voxels  # against 40 x voxels dense
    text = cache.format_info(report)
    assert "top-4" in text and f"top-k dropped: mean {report['top_k_dropped']['mean']:.4g}" in text
    assert cache.verify(store, preprocessed_folder=tmp_path) == [
        f"{c}: no preprocessed {tmp_path}/{c}.b2nd" for c in probs]

    array = zarr.open_array(str(store / "case_b"), mode="r+")
    array[1, 0, 0, 0, 0] = 45  # a class index that does not exist
    array[0, 3, 1, 1, 1] = 255  # values no longer descending, sum above 1, and the dropped mass changed
    problems = cache.verify(store, preprocessed_folder=tmp_path)
    for expected_problem in ("case_b: 1 voxels with a class index >= 40",
                             "case_b: 1 voxels whose top-k probabilities sum to more than 1",
                             "case_b: 1 voxels whose top-k values are not in descending order",
                             "case_b: recorded top-k dropped mass"):
        assert any(p.startswith(expected_problem) for p in problems), (expected_problem, problems)


def test_top_k_is_refused_for_region_caches(tmp_path):
    with pytest.raises(CacheError, match="top_k needs a softmax"):
        cache.write_case(tmp_path / "r.zarr", "case_a", np.zeros((3, 4, 4, 4), np.float32),
                         {**provenance(activation="sigmoid"), "top_k": 2})


def test_soft_label_memory_counts_seven_bytes_per_value_on_the_cpu():
    """float32 mean + nnU-Net's float16 logits + its 1-byte isinf mask (measured: 6.70 GB for 119 classes x
    4.7 M voxels, which the 6-byte formula under-asked); on a GPU the logits and the mask stay there."""
    from fastkd.softlabels import peak_memory_bytes

    shape, voxels = [1, 64, 64, 32], 64 * 64 * 32
    assert peak_memory_bytes(17, shape) - peak_memory_bytes(16, shape) == 7 * voxels
    assert (peak_memory_bytes(17, shape, device_logits_on_cpu=False)
            - peak_memory_bytes(16, shape, device_logits_on_cpu=False)) == 4 * voxels
