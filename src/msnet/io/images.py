"""Folders of 2-D images (PNG, JPEG, TIFF) read as grey-level slices."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from msnet.errors import MsnetError
from msnet.io.volume import CTVolume, read_limits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
"""The names images usually have; they are recognised by their content, never by these."""


def is_image(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:
        return False


def read_images(paths: list[Path], source: Path, sid: str) -> CTVolume:
    from PIL import Image

    slices, notes, size = [], [], None
    for p in paths:
        try:
            with Image.open(p) as im:
                if size is None:  # checked on the header, before the first image is decoded
                    read_limits().check_shape(im.size[1], im.size[0], len(paths), source)
                im = im.convert("L")
                if size is None:
                    size = im.size
                elif im.size != size:
                    notes.append(f"{p.name}: {im.size[0]}x{im.size[1]} resized to {size[0]}x{size[1]}")
                    im = im.resize(size, Image.BILINEAR)
                slices.append(np.asarray(im, dtype=np.float32))
        except MsnetError:
            raise
        except Exception as exc:
            raise MsnetError(f"cannot read image ({type(exc).__name__}: {exc})", p,
                             "remove or re-save the file (PNG, JPEG or TIFF)") from exc
    hu = np.stack(slices)
    return CTVolume(hu=hu, spacing_mm=(1.0, 1.0, 1.0), z_mm=-np.arange(len(slices), dtype=float),
                    study_id=sid, source=str(source), kind="grey", warnings=notes, n_series=1)


def natural_key(text: str) -> list:
    """'img2' sorts before 'img10'.

    >>> sorted(["img10", "img2"], key=natural_key)
    ['img2', 'img10']
    """
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


