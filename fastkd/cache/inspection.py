"""``fastkd cache info`` / ``verify`` / ``show``: what a store holds, whether every chunk of it reads back
as valid probabilities, one slice as a PNG; and :func:`fingerprint`, the ``preprocessed_sha256`` each
case records. Format: :mod:`fastkd.cache.layout`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fastkd.cache.codec import blocks, decode, stored_dtype, stored_shape
from fastkd.cache.layout import CacheError, partial_dir
from fastkd.cache.reader import _open_whole, case_attrs, root_attrs


def _case_dirs(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if (p / "zarr.json").is_file()) if store.is_dir() else []


def _bytes_on_disk(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def info(store: str | Path) -> dict:
    """What ``fastkd cache info`` prints: cases, shapes, dtype, bytes, compression, provenance, completeness."""
    store = Path(store)
    if not store.is_dir():
        raise CacheError(f"{store} does not exist (give the path of a soft-label cache *.zarr)")
    root = root_attrs(store)
    cases, provenance = {}, (root or {}).get("provenance")
    for case in _case_dirs(store):
        attrs = case_attrs(store, case) or {}
        shape, prov = attrs.get("shape"), attrs.get("provenance") or {"dtype": "uint8"}
        values = int(np.prod(shape)) if shape else 0  # dense: C x voxels
        stored = int(np.prod(stored_shape(shape, prov))) if shape else 0
        cases[case] = {"shape": shape, "complete": bool(attrs.get("complete")), "bytes": _bytes_on_disk(store / case),
                       "logical_bytes": stored * np.dtype(stored_dtype(prov)).itemsize, "values": values,
                       "voxels": values // shape[0] if shape else 0, "teacher_folds": attrs.get("teacher_folds"),
                       "top_k_dropped": attrs.get("top_k_dropped"), "unlabelled": bool(attrs.get("unlabelled"))}
        provenance = provenance or attrs.get("provenance")
    total = sum(c["bytes"] for c in cases.values())
    logical = sum(c["logical_bytes"] for c in cases.values())
    dropped = [c for c in cases.values() if c["top_k_dropped"]]
    return {
        "top_k_dropped": {"mean": sum(c["top_k_dropped"]["mean"] * c["voxels"] for c in dropped)
                          / max(1, sum(c["voxels"] for c in dropped)),
                          "max": max(c["top_k_dropped"]["max"] for c in dropped)} if dropped else None,
        "path": str(store), "complete": bool(root and root.get("complete")),
        "n_cases": len(cases), "expected_cases": len(root["cases"]) if root else None,
        "n_unlabelled": sum(c["unlabelled"] for c in cases.values()),
        "bytes": total, "logical_bytes": logical, "float32_bytes": 4 * sum(c["values"] for c in cases.values()),
        "compression_ratio": logical / total if total else None,
        "teacher_forwards": (root or {}).get("teacher_forwards"),
        "partial": sorted(p.name for p in partial_dir(store).iterdir()) if partial_dir(store).is_dir() else [],
        "provenance": provenance, "cases": cases,
    }


def format_info(report: dict, list_cases: bool = False) -> str:
    def mb(n):
        return f"{n / 1e6:.2f} MB"

    p = report["provenance"] or {}
    lines = [f"soft-label cache {report['path']}",
             f"  complete:      {'yes' if report['complete'] else 'NO (root not written: jobs unfinished or failed)'}",
             f"  cases:         {report['n_cases']}" + (f" of {report['expected_cases']}" if report["expected_cases"] else "")
             + f" ({report['n_cases'] - report['n_unlabelled']} labelled, {report['n_unlabelled']} unlabelled)"]
    if p:
        lines += [f"  dtype:         {p['dtype']} (probability = value x {p['scale']:.6g})",
                  f"  channels:      {', '.join(p['channels'])} ({p['activation']})",
                  f"  temperature:   {p['temperature']}",
                  f"  grid:          {p['dataset_name']} {p['plans_name']} {p['configuration']} "
                  f"({p['data_identifier']}), spacing {p['spacing']}, patch {p['patch_size']}",
                  f"  prediction:    sliding window step {p['step_size']}, gaussian, "
                  + (f"mirroring over axes {p['mirror_axes']}" if p["mirroring"] else "no mirroring"),
                  f"  ensemble:      {p['ensemble']}",
                  "  stored:        " + (f"top-{p['top_k']} (per voxel the {p['top_k']} largest probabilities "
                                          "and their classes; the rest spread evenly over the other classes)"
                                          if p.get("top_k") else "every class"),
                  f"  folds/case:    {p.get('folds_per_case', 'all')}"  # stores before the key: all
                  + (f" (split sha256 {p['splits_sha256'][:16]}...)" if p.get("splits_sha256") else "")]
        for t in p["teachers"]:
            lines.append(f"  teacher:       {t['model_folder']} folds {t['folds']} ({t['checkpoint']}), "
                         f"weight {t['weight']}")
            lines += [f"                   fold {f}: sha256 {h[:16]}..." for f, h in t["sha256"].items()]
    ratio = report["compression_ratio"]
    lines += [f"  on disk:       {mb(report['bytes'])} (uncompressed {mb(report['logical_bytes'])}, "
              f"as float32 {mb(report['float32_bytes'])}; compression {ratio:.1f}x)" if ratio else
              f"  on disk:       {mb(report['bytes'])}"]
    if report.get("top_k_dropped"):
        d = report["top_k_dropped"]
        lines.append(f"  top-k dropped: mean {d['mean']:.4g}, max {d['max']:.4g} of each voxel's probability mass "
                     "(1 - sum of the stored top-k)")
    if report["teacher_forwards"]:
        lines.append(f"  teacher forwards spent: {report['teacher_forwards']}")
    if report["partial"]:
        lines.append(f"  unfinished writes in .partial: {', '.join(report['partial'])}")
    incomplete = [c for c, v in report["cases"].items() if not v["complete"]]
    if incomplete:
        lines.append(f"  incomplete cases: {', '.join(incomplete)}")
    if list_cases:
        lines.append("  case                      kind        shape                 bytes   ratio  teacher folds")
        for case, v in report["cases"].items():
            r = v["logical_bytes"] / v["bytes"] if v["bytes"] else 0
            kind = "unlabelled" if v["unlabelled"] else "labelled"
            lines.append(f"  {case:<25} {kind:<11} {str(v['shape']):<20} {v['bytes']:>8} {r:>6.1f}x  "
                         f"{v['teacher_folds'] or ''}")
    return "\n".join(lines)


def fingerprint(preprocessed_folder: str | Path, case: str) -> str:
    """sha256 of the preprocessed ``<case>.b2nd`` the soft labels were computed from (recorded per case
    as ``preprocessed_sha256``; a re-preprocessed case no longer matches, so its soft labels are redone)."""
    from fastkd.io import sha256

    return sha256(Path(preprocessed_folder) / f"{case}.b2nd")


def verify(store: str | Path, preprocessed_folder: str | Path | None = None, tolerance: float | None = None) -> list[str]:
    """Read every chunk of every case; return one problem line per bad case (empty: all good).

    Checks: the store is finalized and lists every case present; every chunk file is there (zarr
    would read a missing one as zeros); checksums (crc32c, on every chunk read); values finite and in
    [0, 1]; softmax voxels sum to one (uint8: exactly 255; float16: within ``tolerance``, default
    1e-2); shape and fingerprint (sha256) equal the preprocessed ``<case>.b2nd`` in
    ``preprocessed_folder`` (default: the folder recorded in the root attributes). Cases are read
    block by block (:func:`fastkd.cache.codec.blocks`), so memory stays bounded.
    """
    import blosc2

    store = Path(store)
    if not store.is_dir():
        raise CacheError(f"{store} does not exist (give the path of a soft-label cache *.zarr)")
    problems = []
    root = root_attrs(store)
    if not root or not root.get("complete"):
        problems.append("(store): not finalized (no complete root zarr.json); its soft-label jobs have not finished")
    present = _case_dirs(store)
    listed = list((root or {}).get("cases", {}))
    problems += [f"{c}: listed in the root but missing" for c in listed if c not in present]
    labelled_folder = preprocessed_folder or (root or {}).get("preprocessed_folder")
    if labelled_folder is None or not Path(labelled_folder).is_dir():
        problems.append(f"(store): preprocessed folder {labelled_folder} not found, cannot compare shapes "
                        "(pass --preprocessed nnUNet_preprocessed/<ds>/<data_identifier>)")
        labelled_folder = None
    listed_unlabelled = set((root or {}).get("unlabelled", ()))
    unlabelled_folder = (root or {}).get("unlabelled_folder")
    if listed_unlabelled and (unlabelled_folder is None or not Path(unlabelled_folder).is_dir()):
        problems.append(f"(store): preprocessed folder of the unlabelled cases {unlabelled_folder} not found, cannot "
                        "compare their shapes")
        unlabelled_folder = None
    for case in present:
        attrs = case_attrs(store, case)
        if not attrs or not attrs.get("complete"):
            problems.append(f"{case}: not marked complete")
            continue
        is_unlabelled = bool(attrs.get("unlabelled"))
        folder = unlabelled_folder if is_unlabelled else labelled_folder
        if root and is_unlabelled != (case in listed_unlabelled):
            problems.append(f"{case}: marked {'un' if is_unlabelled else ''}labelled, but the root lists it as "
                            f"{'un' if case in listed_unlabelled else ''}labelled")
        if is_unlabelled:
            problems += _verify_class_locations(case, attrs)
        p = attrs["provenance"]
        if root and root.get("provenance") and p != root["provenance"]:
            problems.append(f"{case}: written with other settings than the store's root")
        array, problem = _open_whole(store, case)
        if problem:
            problems.append(problem)
            continue
        case_problems = _verify_values(case, array, p, tolerance)
        problems += case_problems
        if folder is not None and not case_problems:
            b2nd = Path(folder) / f"{case}.b2nd"
            if not b2nd.is_file():
                problems.append(f"{case}: no preprocessed {b2nd}")
            elif tuple(blosc2.open(str(b2nd), mode="r").shape[1:]) != tuple(array.shape[1:]):
                problems.append(f"{case}: shape {list(array.shape[1:])} != preprocessed "
                                f"{list(blosc2.open(str(b2nd), mode='r').shape[1:])}")
            elif attrs.get("preprocessed_sha256") and fingerprint(folder, case) != attrs["preprocessed_sha256"]:
                problems.append(f"{case}: the preprocessed case changed since its soft labels were made (sha256 "
                                f"of {b2nd.name} differs); rerun its soft-label job")
    return problems


def _verify_class_locations(case: str, attrs: dict) -> list[str]:
    """An unlabelled case's class locations: present, and every voxel inside the case."""
    stored = attrs.get("class_locations")
    if not isinstance(stored, dict):
        return [f"{case}: unlabelled but without class_locations (its soft-label job predates them; rerun it)"]
    shape = attrs["shape"][1:]
    for key, voxels in stored.items():
        v = np.asarray(voxels, np.int64)
        if len(v) % 3:
            return [f"{case}: class_locations[{key!r}] holds {len(v)} numbers, not x, y, z triples"]
        v = v.reshape(-1, 3)
        if len(v) and ((v < 0).any() or (v >= np.asarray(shape)).any()):
            return [f"{case}: class_locations[{key!r}] has voxels outside the case's shape {shape}"]
    return []


def _verify_values(case: str, array, provenance: dict, tolerance: float | None) -> list[str]:
    """Value checks of one case, block by block; at most one line per kind of problem."""
    if provenance.get("top_k"):
        return _verify_top_k(case, array, provenance)
    scale, nonfinite, low, high, unsummed = np.float32(provenance["scale"]), 0, np.inf, -np.inf, 0
    try:
        for box in blocks(array.shape, array.chunks):
            data = array[box]
            values = data.astype(np.float32) * scale
            finite = np.isfinite(values)
            nonfinite += int((~finite).sum())
            if finite.any():
                low, high = min(low, float(values[finite].min())), max(high, float(values[finite].max()))
            if provenance["activation"] == "softmax":
                if provenance["dtype"] == "uint8":
                    unsummed += int((data.sum(axis=0, dtype=np.int32) != 255).sum())
                else:
                    unsummed += int((np.abs(values.sum(axis=0) - 1) > (tolerance or 1e-2)).sum())
    except Exception as e:
        return [f"{case}: unreadable ({type(e).__name__}: {e})"]
    if nonfinite:
        return [f"{case}: {nonfinite} non-finite values"]
    problems = []
    if low < 0 or high > 1 + 1e-3:
        problems.append(f"{case}: values outside [0, 1] (min {low:.4g}, max {high:.4g})")
    if unsummed:
        problems.append(f"{case}: {unsummed} voxels whose probabilities do not sum to 1")
    return problems


def _verify_top_k(case: str, array, provenance: dict) -> list[str]:
    """Top-k checks: values in descending order summing to at most 255, class indices valid and distinct
    per voxel, and the recorded dropped mass (``top_k_dropped``) equal to the data's."""
    n, k = len(provenance["channels"]), provenance["top_k"]
    bad_sum = bad_index = bad_order = duplicate = 0
    dropped_sum, dropped_max = 0.0, 0.0
    try:
        for box in blocks(array.shape, array.chunks):
            data = array[box]
            values, index = data[0].astype(np.int32), data[1].astype(np.int32)
            total = values.sum(axis=0)
            bad_sum += int((total > 255).sum())
            bad_index += int((index >= n).any(axis=0).sum())
            bad_order += int((np.diff(values, axis=0) > 0).any(axis=0).sum())
            duplicate += int(sum(((index[i] == index[j]).sum() for i in range(k) for j in range(i + 1, k)), 0))
            dropped = 1 - total / 255
            dropped_sum, dropped_max = dropped_sum + float(dropped.sum()), max(dropped_max, float(dropped.max()))
    except Exception as e:
        return [f"{case}: unreadable ({type(e).__name__}: {e})"]
    problems = [f"{case}: {count} voxels {what}" for count, what in (
        (bad_sum, "whose top-k probabilities sum to more than 1"), (bad_index, f"with a class index >= {n}"),
        (bad_order, "whose top-k values are not in descending order"), (duplicate, "with a class stored twice"))
        if count]
    recorded = (case_attrs(Path(str(array.store_path.store.root)), array.store_path.path) or {}).get("top_k_dropped")
    mean = dropped_sum / int(np.prod(array.shape[2:]))
    if not recorded or abs(recorded["mean"] - mean) > 1e-6 or abs(recorded["max"] - dropped_max) > 1e-6:
        problems.append(f"{case}: recorded top-k dropped mass {recorded} != the data's (mean {mean:.6g}, "
                        f"max {dropped_max:.6g})")
    return problems


def show(store: str | Path, case: str, out: str | Path, preprocessed_folder: str | Path | None = None,
         axis: int = 2, index: int | None = None) -> Path:
    """A PNG of one slice: image, reference label, and every channel's soft labels.

    The slice is perpendicular to spatial ``axis`` (0-2); by default the one with the most
    foreground probability. Image and label come from the preprocessed case when it is found.
    """
    import blosc2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import zarr

    store = Path(store)
    attrs = case_attrs(store, case)
    if attrs is None:
        raise CacheError(f"case {case!r} is not in {store} (cases: {', '.join(_case_dirs(store)[:5]) or 'none'})")
    p = attrs["provenance"]
    try:
        probs = decode(zarr.open_array(str(store / case), mode="r")[...], p)
    except Exception as e:
        raise CacheError(f"{store}: case {case} is corrupt ({e})") from e
    foreground = probs[1:].sum(axis=0) if p["activation"] == "softmax" else probs.max(axis=0)
    if index is None:
        other = tuple(a for a in range(3) if a != axis)
        index = int(np.argmax(foreground.sum(axis=other)))
    if not 0 <= index < probs.shape[1 + axis]:
        raise CacheError(f"slice index {index} is outside axis {axis} of size {probs.shape[1 + axis]}")

    def take(volume):  # (x, y, z) -> 2-D slice, shown with the first remaining axis vertical
        return np.take(volume, index, axis=axis)

    root = root_attrs(store) or {}
    folder = Path(preprocessed_folder or root.get("preprocessed_folder") or "")
    panels = []
    if (folder / f"{case}.b2nd").is_file():
        panels.append(("image (channel 0)", take(blosc2.open(str(folder / f"{case}.b2nd"), mode="r")[0]), "gray", None))
        seg = blosc2.open(str(folder / f"{case}_seg.b2nd"), mode="r")[0]
        panels.append(("reference label", take(np.maximum(seg, 0)), "viridis", (0, max(int(seg.max()), 1))))
    for c, name in enumerate(p["channels"]):
        panels.append((f"p({name})", take(probs[c]), "magma", (0, 1)))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0), squeeze=False)
    for ax, (title, image, cmap, limits) in zip(axes[0], panels):
        shown = ax.imshow(image, cmap=cmap, vmin=limits[0] if limits else None, vmax=limits[1] if limits else None)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        if limits == (0, 1):
            fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.suptitle(f"{case}: slice {index} along axis {axis}, T = {p['temperature']}, {p['dtype']}", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
