"""A diagnosis as DICOM objects in the source study, and the two ways to send them to an archive.

- :func:`write_sr`: a Comprehensive SR, TID 1500 measurement report: one measurement group holding
  the predicted class (Finding), each class's probability, the algorithm (model name, version,
  bundle hash), the lung as finding site and the key slices as source images; plus a root
  "Qualitative Evaluations" container with a comment that names the class and says "research use
  only, not for diagnosis".
- :func:`write_kos`: a Key Object Selection document ("Of Interest") referencing the key slices'
  SOP instances, so viewers list them as key images.
- :func:`write_secondary_capture`: a PNG (the Grad-CAM strip) as a Secondary Capture image.
  (Which of them a run writes, and into which folder, is the writer registry's:
  :mod:`msnet.inference.writers`.)
- :func:`store_stow` (DICOMweb STOW-RS) and :func:`store_cstore` (DIMSE C-STORE).

Every object goes into the source study (same StudyInstanceUID; patient and study modules copied
from the source header, as DICOM requires) in a new series with its own UIDs. Those UIDs are derived
from the study, the analysed series, the bundle's hash and the object's kind (:func:`result_uids`),
so writing the result of the same bundle on the same study again gives the same objects: an archive
that receives them twice keeps one SR and one KO, never a duplicate pair. The objects are built
with highdicom, which validates them on construction. The input is explicit: a DICOM-read
:class:`msnet.io.CTVolume` (its ``sop_instance_uids`` and ``dicom_headers``), the class, the
probabilities, the key slice indices (canonical order) and the model's identity.

e.g. model = ModelIdentity("msnet-efficientnet_lite0-msnet", "0.1.0", "ab12...")
e.g. write_sr(vol, "CAP", {"COVID-19": .1, "CAP": .8, "NORMAL": .1}, [40, 41], "out", model)
PosixPath('out/msnet-sr.dcm')
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from msnet.errors import MsnetError
from msnet.files import atomic_path
from msnet.inference.bundle import bundle_sha256
from msnet.io.dicomweb import client, retrying, service_url

logger = logging.getLogger(__name__)

MANUFACTURER = "msnet"
SR_SERIES_NUMBER, KO_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902, 9903
RESEARCH_ONLY = "Research use only, not for diagnosis: not a medical device; not to be used to guide patient care."
LOCAL_SCHEME = "99MSNET"
"""Private coding scheme (PS3.16: designators starting with 99 are local) for what no standard code names."""
UID_NAMESPACE = uuid.UUID("6f1c3a52-7f0e-5b8e-9a57-3d1b2c4e8a10")
"""Namespace of the name-based UUIDs behind the result objects' UIDs (fixed: changing it would make
every result a new object)."""
CLASS_SNOMED = {  # the default classes as SNOMED CT concepts; other class names get a local code
    "COVID-19": ("840539006", "COVID-19"),
    "CAP": ("385093006", "Community acquired pneumonia"),
    "NORMAL": ("17621005", "Normal"),
}


@dataclass(frozen=True)
class ModelIdentity:
    """What the SR names as the algorithm: the bundle's model name, the msnet version, the bundle's hash,
    and the model card's intended use (written into the SR as text)."""

    name: str
    version: str
    bundle_hash: str
    intended_use: str = ""


def model_identity(bundle: str | Path) -> ModelIdentity:
    """Name and version from the bundle's model card; the sha256 of its weights (as in every Prediction)."""

    bundle = Path(bundle)
    card = json.loads((bundle / "metadata.json").read_text())
    version = str(card.get("versions", {}).get("msnet") or card.get("version") or "unknown")
    return ModelIdentity(str(card.get("name") or bundle.name), version, bundle_sha256(bundle),
                         str(card.get("intended_use") or ""))


@dataclass(frozen=True)
class ResultUIDs:
    """The UIDs of one result object: its series and its SOP instance."""

    series: str
    instance: str


def result_uids(volume, model: ModelIdentity, kind: str) -> ResultUIDs:
    """The UIDs of the ``kind`` object ("sr", "ko", "sc") for this study and bundle: the same every time,
    so a result written twice is the same object, not a second one. Each is a ``2.25.`` UID (PS3.5
    B.2) whose UUID is a name-based (version 5) UUID of the StudyInstanceUID, the analysed
    SeriesInstanceUID, the bundle's hash and the kind. (``pydicom.uid.generate_uid(prefix=None, ...)``
    would not do: without a prefix it ignores its entropy sources and returns a random UUID.)

    >>> from types import SimpleNamespace as NS
    >>> vol = NS(dicom_headers={"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4"})
    >>> m = ModelIdentity("m", "1", "ab" * 32)
    >>> result_uids(vol, m, "sr") == result_uids(vol, m, "sr") != result_uids(vol, m, "ko")
    True
    >>> result_uids(vol, m, "sr").series.startswith("2.25.")
    True
    """
    header = volume.dicom_headers
    sources = [str(header.get("StudyInstanceUID", "") or ""), str(header.get("SeriesInstanceUID", "") or ""),
               model.bundle_hash, kind]

    def uid(what: str) -> str:
        return f"2.25.{uuid.uuid5(UID_NAMESPACE, chr(31).join([*sources, what])).int}"

    return ResultUIDs(uid("series"), uid("instance"))


def class_concept(name: str):
    """The coded concept for a class: SNOMED CT for the default classes, else a local code.

    >>> class_concept("CAP").value, class_concept("CAP").scheme_designator
    ('385093006', 'SCT')
    """
    from highdicom.sr import CodedConcept

    if name in CLASS_SNOMED:
        value, meaning = CLASS_SNOMED[name]
        return CodedConcept(value, "SCT", meaning)
    return CodedConcept(local_code("C", name), LOCAL_SCHEME, name[:64])


def warning_concept():
    """The concept name of a warning's TEXT item in the SR (local code)."""
    from highdicom.sr import CodedConcept

    return CodedConcept("WARNING", LOCAL_SCHEME, "Warning")


def intended_use_concept():
    """The concept name of the intended-use TEXT item in the SR (local code)."""
    from highdicom.sr import CodedConcept

    return CodedConcept("INTENDED-USE", LOCAL_SCHEME, "Intended use")


def probability_concept(name: str):
    """The measurement name for one class's probability (local code, meaning "Probability of NAME")."""
    from highdicom.sr import CodedConcept

    return CodedConcept(local_code("P", name), LOCAL_SCHEME, f"Probability of {name}"[:64])


def local_code(prefix: str, name: str) -> str:
    """A code of the local scheme: PREFIX-NAME for a short plain name, else PREFIX-<hash of the name>.

    >>> local_code("P", "CAP"), local_code("P", "ground glass") == local_code("P", "ground glass") != "P-GROUNDGLASS"
    ('P-CAP', True)
    """
    slug = re.sub(r"[^A-Z0-9-]", "", name.upper())
    if not slug or len(slug) > 14 or slug != name.upper():
        slug = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{prefix}-{slug}"


# ------------------------------------------------------------------ source references


def _check_source(volume) -> None:
    if getattr(volume, "dicom_headers", None) is None or not getattr(volume, "sop_instance_uids", None):
        raise MsnetError("DICOM results need a DICOM study (this one was not read from DICOM files)",
                         getattr(volume, "source", None), "pass the DICOM series: a folder, a .zip or a DICOMweb URL")


def _references(volume, indices: Sequence[int]) -> list:
    """One header-only dataset per key slice: the source header with that slice's SOPInstanceUID."""
    _check_source(volume)
    uids = volume.sop_instance_uids
    header = volume.dicom_headers
    refs, seen = [], set()
    for i in indices:
        if not 0 <= int(i) < len(uids):
            raise MsnetError(f"key slice {i} is outside the study's {len(uids)} slices", volume.source,
                             "pass the prediction made on this very volume")
        uid = uids[int(i)]
        if not uid:
            raise MsnetError(f"slice {i} has no SOPInstanceUID", volume.source, "re-export the study from the archive")
        if uid in seen:  # frames of one multi-frame instance
            continue
        seen.add(uid)
        ds = copy.deepcopy(header)
        ds.SOPInstanceUID = uid
        for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                        "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName"):
            if keyword not in ds:
                setattr(ds, keyword, None)  # type 2 in the output: present, empty
        refs.append(ds)
    if not refs:
        raise MsnetError("no key slices to reference", volume.source, "the prediction lists no key slices")
    return refs


def _device(model: ModelIdentity):
    from highdicom.sr import DeviceObserverIdentifyingAttributes, ObserverContext
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    return ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[model.bundle_hash]), name="msnet", manufacturer_name=MANUFACTURER,
            model_name=model.name[:64], serial_number=model.bundle_hash[:16]))


def _identify_local_scheme(ds) -> None:
    """Name the private coding scheme in the dataset (Coding Scheme Identification Sequence)."""
    from pydicom import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = "msnet local codes"
    item.CodingSchemeResponsibleOrganization = "msnet project"
    ds.CodingSchemeIdentificationSequence = [item]


def _save(ds, path: Path) -> Path:
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def _built(what: str, volume, build):
    """Run a highdicom constructor; its validation errors become MsnetError naming the study. Its
    warnings are silenced and identifying values are cut out of error messages: both can quote the
    patient's name or id."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build()
    except MsnetError:
        raise
    except (ValueError, TypeError, AttributeError) as exc:
        raise MsnetError(f"cannot build the {what} from this study's headers ({_redact(str(exc), volume)})",
                         volume.source, "check the source's UIDs and patient/study attributes (e.g. with dciodvfy)") from exc


IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "AccessionNumber",
                "ReferringPhysicianName", "InstitutionName", "StudyID")


def _redact(text: str, volume) -> str:
    header = getattr(volume, "dicom_headers", None)
    for keyword in IDENTIFYING if header is not None else ():
        value = str(header.get(keyword, "") or "").strip()
        if len(value) >= 2:
            text = text.replace(value, "<redacted>")
    return text


# ------------------------------------------------------------------ writers


def key_slice_text(volume, key_slices: Sequence[int]) -> str:
    """The key slices as the JSON, the page and the strip number them: the slice index, 0 = the most
    superior slice (canonical order, head first), with its z position.

    >>> from types import SimpleNamespace as NS
    >>> key_slice_text(NS(z_mm=[10.0, 8.0, 6.0], n_slices=3), [2, 0])
    'Key slices by slice index (0 = most superior slice, head first; 0-2 in this study): 2 (z 6.0 mm), 0 (z 10.0 mm)'
    """
    z = [] if getattr(volume, "z_mm", None) is None else list(volume.z_mm)
    n = int(getattr(volume, "n_slices", len(z)))
    parts = [f"{int(i)} (z {float(z[int(i)]):.1f} mm)" if len(z) == n and 0 <= int(i) < n else str(int(i))
             for i in key_slices]
    return f"Key slices by slice index (0 = most superior slice, head first; 0-{n - 1} in this study): " + ", ".join(parts)


def write_sr(volume, prediction: str, probabilities: dict[str, float], key_slices: Sequence[int],
             out_dir: str | Path, model: ModelIdentity, filename: str = "msnet-sr.dcm",
             warnings: Sequence[str] = ()) -> Path:
    """Write the Comprehensive SR (TID 1500) stating the diagnosis; returns its path.

    Besides the finding and the probabilities, a "Qualitative Evaluations" container holds, as text:
    the result with the research-use disclaimer, every warning of the prediction (``warnings``: the
    same list as the JSON's, e.g. a synthetic-only bundle, partial lung coverage, slice gaps), the
    model card's intended use and the key slices with their slice index (see :func:`key_slice_text`).
    """
    from highdicom.sr import (
        AlgorithmIdentification,
        CodedConcept,
        ComprehensiveSR,
        ContainerContentItem,
        FindingSite,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        RelationshipTypeValues,
        SourceImageForMeasurementGroup,
        TextContentItem,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes

    refs = _references(volume, key_slices)
    if prediction not in probabilities:
        raise MsnetError(f"predicted class {prediction!r} is not among the probabilities {list(probabilities)}",
                         volume.source, "pass the prediction's own probabilities")
    algorithm = AlgorithmIdentification(name=model.name[:64], version=model.version[:64],
                                        parameters=[f"bundle sha256 {model.bundle_hash}"])
    uids = result_uids(volume, model, "sr")
    tracking = result_uids(volume, model, "sr-tracking").instance

    def text(name, value: str):
        return TextContentItem(name=name, relationship_type=RelationshipTypeValues.CONTAINS, value=value[:1024])

    def build():
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=tracking, identifier="msnet study diagnosis"),
            finding_type=class_concept(prediction),
            algorithm_id=algorithm,
            finding_sites=[FindingSite(codes.SCT.Lung)],
            measurements=[Measurement(name=probability_concept(c), value=float(p), unit=codes.UCUM.NoUnits)
                          for c, p in probabilities.items()],
            source_images=[SourceImageForMeasurementGroup(str(r.SOPClassUID), str(r.SOPInstanceUID)) for r in refs],
        )
        report = MeasurementReport(
            observation_context=ObservationContext(observer_device_context=_device(model)),
            procedure_reported=CodedConcept("169069000", "SCT", "CT of chest"),
            imaging_measurements=[group],
            title=codes.DCM.ImagingMeasurementReport,
        )
        note = ContainerContentItem(name=CodedConcept("C0034375", "UMLS", "Qualitative Evaluations"),
                                    relationship_type=RelationshipTypeValues.CONTAINS)
        note.ContentSequence = [
            text(codes.DCM.Comment, f"msnet result: {prediction} (probability {probabilities[prediction]:.3f}); "
                                    f"model {model.name} {model.version}. {RESEARCH_ONLY}"),
            *[text(warning_concept(), f"Warning: {w}") for w in warnings],
            *([text(intended_use_concept(), f"Intended use: {model.intended_use}")] if model.intended_use else []),
            text(codes.DCM.Comment, key_slice_text(volume, key_slices)),
        ]
        report[0].ContentSequence.append(note)
        sr = ComprehensiveSR(
            evidence=refs, content=report[0], series_instance_uid=uids.series, series_number=SR_SERIES_NUMBER,
            sop_instance_uid=uids.instance, instance_number=1, manufacturer=MANUFACTURER, is_complete=True)
        sr.SeriesDescription = "msnet diagnosis (research use only)"
        _identify_local_scheme(sr)
        return sr

    return _save(_built("SR", volume, build), Path(out_dir) / filename)


def write_kos(volume, prediction: str, key_slices: Sequence[int], out_dir: str | Path, model: ModelIdentity,
              filename: str = "msnet-ko.dcm") -> Path:
    """Write the Key Object Selection document referencing the key slices; returns its path."""
    from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
    from pydicom.sr.codedict import codes

    refs = _references(volume, key_slices)
    uids = result_uids(volume, model, "ko")

    def build():
        content = KeyObjectSelection(
            document_title=codes.DCM.OfInterest, referenced_objects=refs, observer_device_context=_device(model),
            description=f"msnet key slices for {prediction} (research use only, not for diagnosis)"[:1024])
        ko = KeyObjectSelectionDocument(
            evidence=refs, content=content, series_instance_uid=uids.series, series_number=KO_SERIES_NUMBER,
            sop_instance_uid=uids.instance, instance_number=1, manufacturer=MANUFACTURER)
        ko.SeriesDescription = "msnet key slices (research use only)"
        return ko

    return _save(_built("Key Object Selection", volume, build), Path(out_dir) / filename)


def write_secondary_capture(volume, png: str | Path, out_dir: str | Path, model: ModelIdentity,
                            filename: str = "msnet-sc.dcm") -> Path:
    """Write an image (e.g. the Grad-CAM key-slice strip) as an RGB Secondary Capture; returns its path."""
    import highdicom as hd
    import numpy as np
    from PIL import Image

    _check_source(volume)
    pixels = np.asarray(Image.open(png).convert("RGB"))
    uids = result_uids(volume, model, "sc")

    def build():
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=_references(volume, [0])[0], pixel_array=pixels, photometric_interpretation="RGB",
            bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=uids.series,
            series_number=SC_SERIES_NUMBER, sop_instance_uid=uids.instance, instance_number=1,
            manufacturer=MANUFACTURER, patient_orientation=("L", "P"),
            transfer_syntax_uid="1.2.840.10008.1.2.1")
        sc.SeriesDescription = "msnet key slices, Grad-CAM (research use only)"
        sc.BodyPartExamined = "CHEST"  # unpaired: Laterality (type 2C) stays absent
        sc.ImageComments = f"{model.name} {model.version}. {RESEARCH_ONLY}"[:10240]
        return sc

    return _save(_built("Secondary Capture", volume, build), Path(out_dir) / filename)


# ------------------------------------------------------------------ sending


def store_stow(url: str, files: Sequence[str | Path]) -> int:
    """Send DICOM files to a DICOMweb server by STOW-RS (``url``: the service's base URL, or a study
    URL on it); retried like a read. Returns the number of instances stored."""
    import pydicom

    base = service_url(url)
    datasets = [pydicom.dcmread(f) for f in files]
    if not datasets:
        return 0
    answer = retrying("STOW-RS store", base, lambda: client(base).store_instances(datasets))
    failed = list(getattr(answer, "FailedSOPSequence", []) or [])
    if failed:
        reasons = sorted({str(getattr(f, "FailureReason", "?")) for f in failed})
        raise MsnetError(f"the server refused {len(failed)} of {len(datasets)} objects (failure reasons {reasons})",
                         base, "check the server's log; it must accept SR, KO and SC storage")
    logger.info("stored %d objects by STOW-RS", len(datasets))
    return len(datasets)


def parse_aet_target(target: str) -> tuple[str, str, int]:
    """``AET@HOST:PORT`` -> (AE title, host, port).

    >>> parse_aet_target("ORTHANC@pacs.local:4242")
    ('ORTHANC', 'pacs.local', 4242)
    """
    m = re.fullmatch(r"([^@\\]{1,16})@(\[[^\]]+\]|[^:@]+):(\d{1,5})", target.strip())
    if m is None or not 0 < int(m[3]) < 65536:
        raise MsnetError(f"not a C-STORE destination: {target!r}", fix="write it as AET@HOST:PORT, e.g. ORTHANC@pacs:4242")
    return m[1].strip(), m[2].strip("[]"), int(m[3])


def store_cstore(target: str, files: Sequence[str | Path], calling_aet: str = "MSNET", attempts: int = 3) -> int:
    """Send DICOM files by C-STORE to ``AET@HOST:PORT``. Returns the number stored."""
    import time

    import pydicom
    from pynetdicom import AE

    called, host, port = parse_aet_target(target)
    datasets = [pydicom.dcmread(f) for f in files]
    if not datasets:
        return 0
    ae = AE(ae_title=calling_aet)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [str(datasets[0].file_meta.TransferSyntaxUID), "1.2.840.10008.1.2.1",
                                             "1.2.840.10008.1.2"])
    for k in range(attempts):
        assoc = ae.associate(host, port, ae_title=called)
        if assoc.is_established:
            break
        if k + 1 < attempts:
            time.sleep(2**k)
    else:
        raise MsnetError(f"no association with {called} after {attempts} tries (rejected, aborted or unreachable)",
                         target, "check the AE title, host and port, and that the archive knows this calling AE title")
    try:
        bad = []
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code not in (0x0000, 0xB000, 0xB007, 0xB006):  # success or warning
                bad.append(f"{ds.SOPClassUID.name}: status {'none' if code is None else hex(code)}")
    finally:
        assoc.release()
    if bad:
        raise MsnetError(f"C-STORE failed for {len(bad)} of {len(datasets)} objects ({'; '.join(bad)})", target,
                         "check the archive's log")
    logger.info("stored %d objects by C-STORE to %s", len(datasets), called)
    return len(datasets)
