"""What an unlabelled image's class locations cost at BraTS and CT scale: the teachers' segmentation and the
pick of foreground voxels (fastkd.unlabelled.teacher_class_locations) on the probabilities of random blobs,
the growth of the process's peak memory during that call, the size of the case attribute, and reading it
back per training sample (what fastkd.student.loader.WithUnlabelled does for every unlabelled sample).

    python benchmarks/bench_unlabelled.py
"""

import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from fastkd import cache
from fastkd.unlabelled import teacher_class_locations

PLANS = {"dataset_name": "D", "plans_name": "P", "configurations": {}, "transpose_forward": [0, 1, 2],
         "transpose_backward": [0, 1, 2], "image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager",
         "original_median_spacing_after_transp": [1, 1, 1], "original_median_shape_after_transp": [1, 1, 1],
         "experiment_planner_used": "bench", "foreground_intensity_properties_per_channel": {}}
VOLUMES = (("BraTS-sized", 5, (155, 240, 240)), ("CT-sized", 41, (200, 256, 256)))


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: kB


def blobs(n_classes: int, shape, seed: int = 0) -> np.ndarray:
    """Probabilities (C, *shape) of one random ball per foreground class: the segmentation of a teacher."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    for k in range(1, n_classes):
        centre, radius = [rng.integers(10, s - 10) for s in shape], rng.integers(6, 30)
        label[sum((g - c) ** 2 for g, c in zip(grid, centre)) < radius ** 2] = k
    probs = np.full((n_classes, *shape), 0.1 / n_classes, np.float32)
    for k in range(n_classes):
        probs[k][label == k] += 0.9
    return probs


def main() -> None:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: F401  (imported before timing)

    for name, n_classes, shape in VOLUMES:
        probs = blobs(n_classes, shape)
        dataset_json = {"labels": {"background": 0, **{f"s{k}": k for k in range(1, n_classes)}}}
        before, t = peak_gb(), time.perf_counter()
        locations = teacher_class_locations(probs, PLANS, dataset_json)
        seconds, growth = time.perf_counter() - t, peak_gb() - before
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "case").mkdir()
            (Path(tmp) / "case" / "zarr.json").write_text(
                json.dumps({"attributes": {cache.ATTR: {"class_locations": locations}}}))
            t = time.perf_counter()
            for _ in range(20):
                cache.layout.decode_class_locations(cache.case_attrs(tmp, "case")["class_locations"])
            read = (time.perf_counter() - t) / 20
        print(f"{name}: {n_classes} classes x {shape}, probabilities {probs.nbytes / 1e9:.2f} GB: class locations "
              f"in {seconds:.2f} s, peak memory +{growth:.2f} GB during the call, attribute "
              f"{len(json.dumps(locations)) / 1e3:.0f} kB, read back per training sample {read * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
