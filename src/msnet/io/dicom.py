"""DICOM series: headers, series choice, geometric slice sort, and the decode of the chosen series."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from msnet.errors import MsnetError
from msnet.io.decode import DecodeTask, decode_series, gdcm_direct_ok, map_chunks, quiet_pydicom, stored_bytes_problem
from msnet.io.orient import to_canonical
from msnet.io.pixeldata import PIXEL_INFO_ATTR, parse_header, pixel_info
from msnet.io.volume import CTVolume, read_limits

logger = logging.getLogger(__name__)

IMAGE_TYPES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "ECT": "1.2.840.10008.5.1.4.1.1.2.1",
               "LECT": "1.2.840.10008.5.1.4.1.1.2.2"}
_CONVERT_FIX = "convert the files to an uncompressed transfer syntax (e.g. `gdcmconv --raw IN OUT`)"


def read_header(path: Path):
    """The dataset without pixel data, or None when the file is not DICOM.

    This is the only pydicom parse of the file (see :mod:`msnet.io.pixeldata`): where the pixel
    data lies is kept with the header (:func:`msnet.io.pixeldata.pixel_info`), and the decode reads
    that element alone.
    """
    found = parse_header(path)
    if found is None:
        return None
    ds, info = found
    setattr(ds, PIXEL_INFO_ATTR, info)
    return ds


def _headers_chunk(paths: list[Path]) -> list:
    with quiet_pydicom():
        return [read_header(p) for p in paths]


def read_headers(paths: list[Path]) -> list:
    """:func:`read_header` of each file, in order; a large series is parsed in the decode worker
    processes (the header pass is pure Python: on 16 cores it is otherwise the slowest step of a read)."""
    return map_chunks(_headers_chunk, list(paths))


def _series_key(ds) -> str:
    return str(ds.get("SeriesInstanceUID", "") or "")


def _series_info(uid: str, members: list) -> dict:
    ds = members[0][1]
    image_type = [str(t).upper() for t in (ds.get("ImageType") or [])]
    sop = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "") or "")
    is_image = sop in IMAGE_TYPES.values() or (modality == "CT" and not sop.startswith(
        ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88", "1.2.840.10008.5.1.4.1.1.104")))
    n = sum(int(m[1].get("NumberOfFrames", 1) or 1) for m in members)
    try:
        number = int(ds.get("SeriesNumber"))
    except (TypeError, ValueError):
        number = 10**9
    iop = ds.get("ImageOrientationPatient")
    axial = True
    if iop is not None and len(iop) == 6:
        normal = np.cross([float(v) for v in iop[:3]], [float(v) for v in iop[3:]])
        axial = bool(abs(normal[2]) >= 0.7 * (np.linalg.norm(normal) or 1.0))
    return {"uid": uid, "files": members, "modality": modality or "?", "n": n, "number": number, "axial": axial,
            "ct": is_image and (modality in ("CT", "") or sop in IMAGE_TYPES.values()),
            "localizer": "LOCALIZER" in image_type, "is_image": is_image}


def _choose_series(headers: list, series, source: Path) -> tuple[dict, list[str], int]:
    groups: dict[str, list] = {}
    for f, ds in headers:
        groups.setdefault(_series_key(ds), []).append((f, ds))
    infos = sorted((_series_info(u, m) for u, m in groups.items()), key=lambda i: (i["number"], i["uid"]))
    # no UID in the listing: it goes to warnings and logs, which never hold a DICOM value
    listing = "; ".join(f"[{k}] {i['modality']} {i['n']} slices"
                        + (f", series number {i['number']}" if i["number"] < 10**9 else "") + (
                            "" if i["axial"] else ", not axial") for k, i in enumerate(infos))
    notes: list[str] = []
    if series is not None:
        chosen = next((i for i in infos if i["uid"] == str(series)), None)
        if chosen is None and str(series).strip().lstrip("-").isdigit():
            k = int(series)
            chosen = infos[k] if -len(infos) <= k < len(infos) else None
        asked = f"series {series}" if str(series).strip().lstrip("-").isdigit() else "the series asked for"
        if chosen is None:
            raise MsnetError(f"{asked} not found in this study; series here: {listing}", source,
                             "pass one of the indices listed, or a SeriesInstanceUID of the study "
                             "(`msnet inspect --series INDEX` shows each)")
        if not chosen["ct"] or chosen["localizer"]:
            if not chosen["is_image"] or chosen["modality"] not in ("CT", "?"):
                raise MsnetError(f"{asked} is {chosen['modality']}, not a CT image series",
                                 source, "choose a CT image series")
            notes.append(f"{asked} is a localizer/scout, read as asked")
    else:
        candidates = [i for i in infos if i["ct"] and not i["localizer"]]
        if not candidates:
            mods = sorted({i["modality"] for i in infos})
            raise MsnetError(f"no CT image series found (modalities: {', '.join(mods)}; series: {listing})",
                             source, "point to a CT study (localizers, SR and secondary captures are not read)")
        chosen = max(candidates, key=lambda i: (i["axial"], i["n"], -i["number"]))
    if len(infos) > 1:
        k = infos.index(chosen)
        notes.append(f"{len(infos)} series found, read [{k}]; series: {listing}; "
                     "pass --series INDEX (or a SeriesInstanceUID) to read another")
    return chosen, notes, len(infos)


def _check_modality(chosen: dict, source: Path) -> list[str]:
    """A CT image (SOP class) whose Modality (0008,0060) says otherwise is refused: one of the two is
    wrong, and the model takes CT only. A CT-tagged series of another image SOP class is warned."""
    ds = chosen["files"][0][1]
    sop = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "")
    if sop in IMAGE_TYPES.values() and modality not in ("CT", ""):
        raise MsnetError(f"Modality (0008,0060) is {modality[:16]!r} but the SOP class is CT Image Storage: the "
                         "header contradicts itself, and the model takes CT only", source,
                         "if this is a CT series, correct its Modality tag to CT (e.g. `dcmodify -m Modality=CT`); "
                         "otherwise pass a CT series")
    if modality == "CT" and sop and sop not in IMAGE_TYPES.values():
        return [f"Modality (0008,0060) is CT but the SOP class is not CT Image Storage: check that this is a CT "
                "series (the model takes CT only)"]
    return []


def read_dicom(headers: list, others: list, source: Path, sid: str, series) -> CTVolume:
    chosen, notes, n_series = _choose_series(headers, series, source)
    notes += _check_modality(chosen, source)
    if others:
        shown = ", ".join(p.name for p in others[:3]) + (" ..." if len(others) > 3 else "")
        notes.insert(0, f"{len(others)} non-DICOM files skipped ({shown})")
    files, seen = [], set()
    for f, ds in chosen["files"]:
        sop = str(ds.get("SOPInstanceUID", "")) or str(f)
        if sop in seen:
            notes.append(f"{f.name}: duplicate SOPInstanceUID, skipped")
            continue
        seen.add(sop)
        files.append((f, ds))
    ts = str(getattr(files[0][1], "file_meta", {}).get("TransferSyntaxUID", "") or "") or None
    sizes = {(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)) for _, ds in files}
    if len(sizes) > 1:
        raise MsnetError(f"slices of different sizes in one series: {sorted(sizes)}", source,
                         "pass series= to pick a single series, or remove the odd files")
    rows, cols = sizes.pop()
    frames = [max(int(ds.get("NumberOfFrames") or 1), 1) for _, ds in files]
    read_limits().check_shape(rows, cols, sum(frames), source)
    files, frames, short = _drop_short_files(files, frames, rows, cols, source)
    notes += short
    slices = []  # (file index, frame index or None)
    for i, (_, ds) in enumerate(files):
        multi = frames[i] > 1 or "PerFrameFunctionalGroupsSequence" in ds
        slices.extend((i, k if multi else None) for k in range(frames[i]))
    geo = [_frame_geometry(files[i][1], k) for i, k in slices]
    _check_rescale(geo, [files[i][0] for i, _ in slices], source)
    order, z, step, geo_notes, tilt = _sort_slices(geo)
    slot = np.empty(len(slices), int)
    slot[order] = np.arange(len(slices))
    try:
        import gdcm  # noqa: F401

        direct = [gdcm_direct_ok(ds) for _, ds in files]
    except ImportError:
        direct = [False] * len(files)
    tasks = [DecodeTask(str(f), [], (rows, cols), d, pixel_info(ds)) for (f, ds), d in zip(files, direct)]
    for j, (i, k) in enumerate(slices):
        ds = files[i][1]
        pad, lim = ds.get("PixelPaddingValue"), ds.get("PixelPaddingRangeLimit")
        tasks[i][1].append((k, int(slot[j]), geo[j]["slope"], geo[j]["intercept"],
                            None if pad is None else int(pad), None if lim is None else int(lim)))
    hu, results, decoders = decode_series(tasks, len(slices), ts)
    sops = [""] * len(slices)
    for j, (i, _) in enumerate(slices):
        sops[slot[j]] = str(files[i][1].get("SOPInstanceUID", "") or "")
    failures = [(files[i][0], err) for i, (_, err) in enumerate(results) if err]
    if len(failures) == len(files):
        f, err = failures[0]
        fix = "re-export the study from the scanner or archive"
        if "decode" in err.lower() or "plugin" in err.lower() or "support" in err.lower():
            fix = f"transfer syntax {ts} cannot be decoded here: {_CONVERT_FIX}"
        raise MsnetError(f"no slice could be decoded ({len(failures)} files); first error: {err}", f, fix)
    if failures:
        bad = {slot[j] for j, (i, _) in enumerate(slices) if results[i][1]}
        keep = np.array([k not in bad for k in range(len(slices))])
        hu, z, sops = hu[keep], z[keep], [s for s, k in zip(sops, keep) if k]
        geo_notes = _sort_slices([geo[j] for j in order if slot[j] not in bad])[3]
        order = [j for j in order if slot[j] not in bad]
        notes += [f"{f.name}: skipped, pixel data could not be decoded ({err})" for f, err in failures]
    row_mm, col_mm = geo[order[0]]["pixel_mm"]
    if geo[order[0]]["pixel_mm_missing"]:
        geo_notes.append("PixelSpacing missing: 1 mm assumed")
    spacing = (float(step), float(row_mm), float(col_mm))
    hu, spacing, z, orient_notes, resliced = _orient(hu, spacing, z, geo[order[0]], geo[order[-1]], tilt, source)
    geo_notes += orient_notes
    if resliced:
        sops = None  # the new slices cut across the series' instances
    vol = CTVolume(hu=hu, spacing_mm=spacing, z_mm=np.asarray(z, float),
                   study_id=sid, source=str(source), kind="hu", warnings=notes + geo_notes,
                   transfer_syntax=ts, n_series=n_series, series_uid=chosen["uid"] or None,
                   sop_instance_uids=sops, dicom_headers=files[slices[order[0]][0]][1])
    logger.debug("read %d slices of %s (decoder %s)", vol.n_slices, sid, ", ".join(decoders))
    return vol


def _orient(hu, spacing, z, first: dict, last: dict, tilt: float, source: Path):
    """The decoded series in canonical orientation (see :mod:`msnet.io.orient`); a series without
    ImageOrientationPatient is taken as axial, as stored."""
    iop = first["iop"]
    if iop is None or len(iop) != 6 or not np.all(np.isfinite(iop)) or first["ipp"] is None:
        return hu, spacing, z, [], False
    col_dir, row_dir = np.asarray(iop[:3], float), np.asarray(iop[3:], float)  # along a row; along a column
    normal = np.cross(col_dir, row_dir)
    d = last["ipp"] - first["ipp"] if last["ipp"] is not None else np.zeros(3)
    if np.linalg.norm(d) > 1e-6:
        slice_dir = normal * np.sign(d @ normal or 1.0)
    else:  # one slice: it is the top one
        slice_dir = -normal * np.sign(normal[2] or 1.0)
    return to_canonical(hu, spacing, z, first["ipp"], slice_dir, row_dir, col_dir, tilt, source,
                        read_limits().max_voxels)


def _drop_short_files(files: list, frames: list[int], rows: int, cols: int, source: Path):
    """Files that cannot hold the pixels their header declares are skipped (with a note) before
    anything is allocated; MsnetError when none is left."""
    keep, kept_frames, notes, first = [], [], [], None
    for (f, ds), n in zip(files, frames):
        problem = stored_bytes_problem(str(f), ds, rows, cols, n)
        if problem:
            notes.append(f"{f.name}: skipped, pixel data could not be decoded ({problem})")
            first = first or (f, problem)
        else:
            keep.append((f, ds))
            kept_frames.append(n)
    if not keep:
        raise MsnetError(f"no slice could be decoded ({len(files)} files); first error: {first[1]}", first[0],
                         "re-export the study from the scanner or archive")
    return keep, kept_frames, notes


def _check_rescale(geo: list[dict], paths: list[Path], source: Path) -> None:
    """RescaleSlope 0 (every pixel the same HU) or a non-finite slope/intercept: refused."""
    bad = [(p, g) for p, g in zip(paths, geo)
           if g["slope"] == 0 or not np.isfinite(g["slope"]) or not np.isfinite(g["intercept"])]
    if bad:
        p, g = bad[0]
        raise MsnetError(f"RescaleSlope {g['slope']:g} / RescaleIntercept {g['intercept']:g} in {len(bad)} of "
                         f"{len(geo)} slices (first: {p.name}): the pixels cannot be turned into HU", source,
                         "re-export the study; RescaleSlope must be a finite number other than 0")


def _frame_geometry(ds, frame: int | None) -> dict:
    """Position, orientation, spacing and rescale of one slice (classic or per-frame)."""
    items = [ds]
    if frame is not None:
        for seq in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
            groups = ds.get(seq)
            if groups:
                items.append(groups[frame] if seq.startswith("PerFrame") and len(groups) > frame else groups[0])

    def find(seq_name, tag, default=None):
        for it in items[1:]:
            seq = it.get(seq_name)
            if seq and tag in seq[0] and seq[0].get(tag) not in (None, ""):
                return seq[0].get(tag)
        value = ds.get(tag)
        return default if value in (None, "") else value

    ipp = find("PlanePositionSequence", "ImagePositionPatient")
    iop = find("PlaneOrientationSequence", "ImageOrientationPatient")
    px = find("PixelMeasuresSequence", "PixelSpacing")
    return {"ipp": None if ipp is None else np.array([float(v) for v in ipp]),
            "iop": None if iop is None else np.array([float(v) for v in iop]),
            "loc": None if ds.get("SliceLocation") in (None, "") or frame is not None else float(ds.SliceLocation),
            "inst": int(ds.get("InstanceNumber") or 0) * 10000 + (frame or 0),
            "slope": float(find("PixelValueTransformationSequence", "RescaleSlope", 1.0)),
            "intercept": float(find("PixelValueTransformationSequence", "RescaleIntercept", 0.0)),
            "pixel_mm": (float(px[0]), float(px[1])) if px else (1.0, 1.0), "pixel_mm_missing": not px,
            "thickness": find("PixelMeasuresSequence", "SliceThickness")}


def _sort_slices(geo: list[dict]) -> tuple[list[int], np.ndarray, float, list[str], float]:
    """Order (along the slice normal; superior first for axial slices), position per slice along the
    normal, slice step, warnings, and the gantry tilt (degrees between the slices' progression and their
    normal; 0 without geometry). Oblique planes and tilt are judged by :mod:`msnet.io.orient`."""
    notes: list[str] = []
    n = len(geo)
    if all(g["ipp"] is not None and g["iop"] is not None and len(g["iop"]) == 6 for g in geo):
        iop = geo[0]["iop"]
        normal = np.cross(iop[:3], iop[3:])
        normal /= np.linalg.norm(normal) or 1.0
        if normal[2] < 0:
            normal = -normal  # point to the head (+z in LPS)
        pos = np.array([g["ipp"] @ normal for g in geo])
        if any(not np.allclose(g["iop"], iop, atol=1e-3) for g in geo):
            notes.append("ImageOrientationPatient differs between slices")
    elif all(g["loc"] is not None for g in geo):
        pos = np.array([g["loc"] for g in geo])
        notes.append("no ImagePositionPatient/ImageOrientationPatient: sorted by SliceLocation")
    else:
        pos = -np.array([g["inst"] for g in geo], float)
        notes.append("no slice geometry: sorted by InstanceNumber (1 assumed to be the top slice)")
        order = list(np.argsort(-pos, kind="stable"))
        t = geo[0]["thickness"]
        step = float(t) if t else 1.0
        return order, -np.arange(n) * step, step, notes, 0.0
    order = list(np.argsort(-pos, kind="stable"))
    z = pos[order]
    steps = -np.diff(z)
    if n < 2:
        t = geo[0]["thickness"]
        return order, z, float(t) if t else 1.0, notes, 0.0
    if np.any(steps < 1e-3):
        notes.append(f"{int(np.sum(steps < 1e-3))} duplicate slice positions")
    pos_steps = steps[steps >= 1e-3]
    step = float(np.median(pos_steps)) if pos_steps.size else 1.0
    gaps = np.flatnonzero(steps > 1.5 * step)
    if gaps.size:
        notes.append(f"{gaps.size} gaps in slice positions (largest {steps.max():.2f} mm, median step {step:.2f} mm)")
    elif pos_steps.size and np.max(np.abs(pos_steps - step)) > max(0.01 * step, 1e-3):
        notes.append(f"uneven slice steps ({pos_steps.min():.3f}..{pos_steps.max():.3f} mm)")
    angle = 0.0
    if geo[0]["ipp"] is not None and geo[0]["iop"] is not None and n >= 2:
        d = geo[order[-1]]["ipp"] - geo[order[0]]["ipp"]
        if np.linalg.norm(d) > 1e-6:
            iop = geo[0]["iop"]
            nn = np.cross(iop[:3], iop[3:])
            cosang = abs(d @ nn) / (np.linalg.norm(d) * (np.linalg.norm(nn) or 1.0))
            angle = float(np.degrees(np.arccos(min(1.0, cosang))))
    return order, z, step, notes, angle


