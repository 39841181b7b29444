"""The readers, registered by what they accept (MONAI's ``ImageReader`` pattern): each says whether it
takes a path (:meth:`StudyReader.accepts`), then reads it (:meth:`StudyReader.read`). A new format is
one module with one reader plus one :func:`register_reader` call; :func:`msnet.io.open_study`, the
upload code and the dataset index ask the registry, never a list of suffixes of their own.

Files are offered to the readers in registration order: NIfTI and MetaImage by suffix, then a DICOM
file (by its content: a readable header), then a 2-D image (by its content). A folder is read by
:class:`FolderReader`: its DICOM files (any names, searched recursively), else its images.

>>> reader_for(Path("case.nii.gz")).name
'nifti'
>>> ".mha" in known_suffixes() and ".zip" in known_suffixes()
True
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from msnet.errors import MsnetError
from msnet.io.dicom import read_dicom, read_header, read_headers
from msnet.io.images import IMAGE_SUFFIXES, is_image, natural_key, read_images
from msnet.io.metaimage import METAIMAGE_SUFFIXES, read_metaimage
from msnet.io.nifti import NIFTI_SUFFIXES, read_nifti
from msnet.io.volume import CTVolume

ARCHIVE_SUFFIXES = (".zip",)
"""Containers :func:`msnet.io.open_study` unpacks before a reader sees them."""
_SKIP_NAMES = {"DICOMDIR"}


class StudyReader(Protocol):
    """A reader of one kind of study."""

    name: str
    suffixes: tuple[str, ...]
    """File name endings it is known by (lower case; empty when it goes by content)."""

    def accepts(self, path: Path) -> bool:
        """Whether this reader takes ``path`` (cheap: a suffix or a header, never the pixels)."""

    def read(self, path: Path, study_id: str, series: str | int | None = None) -> CTVolume:
        """The study at ``path``; MsnetError naming the file, the problem and the fix."""


def has_suffix(path: Path | str, suffixes: tuple[str, ...]) -> bool:
    """Whether the name ends with one of ``suffixes``, in any case.

    >>> has_suffix(Path("CASE.NII.GZ"), NIFTI_SUFFIXES)
    True
    """
    return Path(path).name.lower().endswith(suffixes)


class NiftiReader:
    name, suffixes = "nifti", NIFTI_SUFFIXES

    def accepts(self, path: Path) -> bool:
        return has_suffix(path, self.suffixes) and not path.is_dir()

    def read(self, path: Path, study_id: str, series=None) -> CTVolume:
        return read_nifti(path, study_id)


class MetaImageReader:
    name, suffixes = "metaimage", METAIMAGE_SUFFIXES

    def accepts(self, path: Path) -> bool:
        return has_suffix(path, self.suffixes) and not path.is_dir()

    def read(self, path: Path, study_id: str, series=None) -> CTVolume:
        return read_metaimage(path, study_id)


class DicomFileReader:
    """One DICOM file (a single slice, or a multi-frame image)."""

    name, suffixes = "dicom", (".dcm",)

    def accepts(self, path: Path) -> bool:
        return path.is_file() and read_header(path) is not None

    def read(self, path: Path, study_id: str, series=None) -> CTVolume:
        header = read_header(path)
        if header is None:
            raise MsnetError("not a DICOM file", path, "pass a DICOM file or series folder")
        return read_dicom([(path, header)], [], path, study_id, series)


class ImageFileReader:
    """One 2-D image (PNG, JPEG, TIFF), recognised by its content, not its name."""

    name, suffixes = "image", IMAGE_SUFFIXES

    def accepts(self, path: Path) -> bool:
        return path.is_file() and is_image(path)

    def read(self, path: Path, study_id: str, series=None) -> CTVolume:
        return read_images([path], path, study_id)


class FolderReader:
    """A folder: its DICOM files (any names, searched recursively; the series chosen as in
    :mod:`msnet.io.dicom`), else its images in natural name order."""

    name, suffixes = "folder", ()

    def accepts(self, path: Path) -> bool:
        return path.is_dir()

    def read(self, path: Path, study_id: str, series=None) -> CTVolume:
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise MsnetError("empty folder", path, "point to the folder that holds the study's files")
        outside = _links_outside(path, files)
        vol = _read_folder(path, files, study_id, series)
        if outside:
            shown = ", ".join(str(p.relative_to(path)) for p in outside[:3]) + (" ..." if len(outside) > 3 else "")
            vol.warnings.append(f"{len(outside)} files are links to places outside the study folder ({shown}): "
                                "read anyway; check that they belong to this study")
        return vol


READERS: list[StudyReader] = []


def register_reader(reader: StudyReader, first: bool = False) -> StudyReader:
    """Add a reader to the registry (``first``: ahead of the others, e.g. to take over a suffix)."""
    READERS.insert(0, reader) if first else READERS.append(reader)
    return reader


for _reader in (NiftiReader(), MetaImageReader(), DicomFileReader(), ImageFileReader(), FolderReader()):
    register_reader(_reader)


def reader_for(path: Path) -> StudyReader | None:
    """The first registered reader that accepts ``path``; None when none does."""
    for reader in READERS:
        if reader.accepts(path):
            return reader
    return None


def known_suffixes() -> tuple[str, ...]:
    """Every suffix a study may be named by: the readers' and the archives'."""
    out: list[str] = []
    for reader in READERS:
        out += [s for s in reader.suffixes if s not in out]
    return tuple(out) + ARCHIVE_SUFFIXES


def volume_suffixes() -> tuple[str, ...]:
    """Suffixes of single-file volumes (NIfTI, MetaImage and any registered like them): a file a
    folder may hold instead of a series."""
    return tuple(s for r in READERS if r.name in ("nifti", "metaimage") for s in r.suffixes)


def is_volume_file(path: Path | str) -> bool:
    """A NIfTI / MetaImage file, by its name (e.g. the one member of an uploaded zip)."""
    return has_suffix(path, volume_suffixes())


def study_stem(name: str) -> str:
    """A file or folder name without the suffix a reader or an archive knows it by: the study's default id.

    >>> study_stem("case7.nii.gz"), study_stem("case7.ZIP"), study_stem("folder.v2")
    ('case7', 'case7', 'folder.v2')
    """
    for suffix in sorted(known_suffixes(), key=len, reverse=True):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def read_path(path: Path, study_id: str, series=None) -> CTVolume:
    """``path`` read by the first reader that accepts it."""
    reader = reader_for(path)
    if reader is None:
        raise MsnetError("not a DICOM, NIfTI, MetaImage or image file", path,
                         "pass a DICOM series folder, a .nii/.nii.gz or .mha file or an image")
    return reader.read(path, study_id, series)


def _links_outside(root: Path, files: list[Path]) -> list[Path]:
    """Files that resolve (through a link to the file or to a folder above it) outside ``root``."""
    base = root.resolve()
    out = []
    for f in files:
        try:
            f.resolve().relative_to(base)
        except ValueError:
            out.append(f)
    return out


def _read_folder(path: Path, files: list[Path], sid: str, series) -> CTVolume:
    headers, others = [], []
    files = [f for f in files if f.name.upper() not in _SKIP_NAMES]
    for f, h in zip(files, read_headers(files)):
        (headers.append((f, h)) if h is not None else others.append(f))
    if headers:
        return read_dicom(headers, others, path, sid, series)
    images = [f for f in others if is_image(f)]
    if images:
        images.sort(key=lambda p: natural_key(str(p.relative_to(path))))
        vol = read_images(images, path, sid)
        skipped = len(others) - len(images)
        if skipped:
            vol.warnings.append(f"{skipped} files that are not images were skipped")
        return vol
    volumes = [f for f in others if is_volume_file(f)]
    fix = f"pass the volume file itself ({volumes[0].name})" if volumes else \
        "point to a folder of DICOM files (any names, searched recursively) or of PNG/JPEG/TIFF images"
    raise MsnetError(f"no DICOM files or images among {len(others)} files", path, fix)
