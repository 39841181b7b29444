"""FHIR R4 output (``fhir``, ``--fhir-out DIR``): one transaction Bundle per study, ``DIR/<study id>/msnet-fhir.json``.

The Bundle holds (docs/fhir.md has an example and how to post it):

- a **DiagnosticReport** (status ``preliminary``: a model's output no clinician has verified;
  category Radiology, code LOINC 24627-2 "CT Chest"): the predicted class as ``conclusionCode``
  (SNOMED CT for COVID-19 / CAP / normal, else a local code), a ``conclusion`` and a narrative that
  state the class, its probability, the model, the research-use disclaimer, every warning of the
  prediction and the key slices; ``result`` refers to
- one **Observation** per class: the class's probability (``valueQuantity``, UCUM unit ``1``), made by
- a **Device**: the model (its name, msnet version, manufacturer "msnet"; identified by the sha256 of
  the bundle's weights), with the research-use note and the model card's intended use.

Identifiers: the report carries the prediction's study id (a pseudonym: the folder or zip name,
with ``msnet listen`` the StudyInstanceUID) and a result id; no patient's name, id, birth date or
accession number is ever written, and no subject: the hospital links the report to its patient.
A study id equal to one of the DICOM header's identifying values (e.g. a folder named after the
PatientID) is replaced by a hash of it. The result id and the Observations' ids are name-based
UUIDs of the study, the series and the bundle's hash, and every entry is a conditional update on
its identifier: posting the same result twice leaves one report, as with the SR.

The resources are checked with ``fhir.resources``' R4B models (FHIR 4.3.0, whose DiagnosticReport,
Observation, Device and Bundle have the same elements as R4 4.0.1's) before the file is written;
that package is the ``fhir`` extra: ``pip install 'msnet[fhir]'``.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from msnet.errors import MsnetError
from msnet.files import atomic_write_text
from msnet.inference.dicom_out import (CLASS_SNOMED, IDENTIFYING, RESEARCH_ONLY, UID_NAMESPACE, key_slice_text,
                                       local_code)
from msnet.inference.writers.base import StudyContext, Writer, register_writer, study_folder

log = logging.getLogger(__name__)

FILENAME = "msnet-fhir.json"
FHIR_VERSION = "4.0.1"
STUDY_ID_SYSTEM = "urn:msnet:study-id"
"""Identifier system of the pseudonymous study id (the id msnet reports the study under)."""
BUNDLE_HASH_SYSTEM = "urn:msnet:bundle-sha256"
"""Identifier system of the Device: the sha256 of the model bundle's weights."""
CODE_SYSTEM = "urn:msnet:codes"
"""Local code system (the SR's ``99MSNET`` scheme): ``P-<CLASS>`` is "Probability of CLASS"."""
UUID_SYSTEM = "urn:ietf:rfc:3986"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
REPORT_STATUS = "preliminary"


def _uuid(*parts: str) -> str:
    return str(uuid.uuid5(UID_NAMESPACE, chr(31).join(parts)))


def pseudonymous_study_id(prediction: dict, volume) -> str:
    """The study id to write: the prediction's, unless it equals an identifying value of the DICOM
    header (PatientID, PatientName, AccessionNumber ...), then ``msnet-`` and 16 hex of its sha256.

    >>> from types import SimpleNamespace as NS
    >>> pseudonymous_study_id({"study_id": "P001"}, NS(dicom_headers={"PatientID": "98C14734"}))
    'P001'
    >>> pseudonymous_study_id({"study_id": "98C14734"}, NS(dicom_headers={"PatientID": "98C14734"}))[:6]
    'msnet-'
    """
    study_id = str(prediction.get("study_id") or getattr(volume, "study_id", "") or "study")
    header = getattr(volume, "dicom_headers", None)
    if header is not None:
        values = {str(header.get(k, "") or "").strip() for k in IDENTIFYING}
        if study_id.strip() in values - {""}:
            log.warning("the study id is an identifying value of the DICOM header: the FHIR output uses a hash of it")
            return "msnet-" + hashlib.sha256(study_id.encode()).hexdigest()[:16]
    return study_id


def _class_concept(name: str) -> dict:
    if name in CLASS_SNOMED:
        code, display = CLASS_SNOMED[name]
        return {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": name}
    return {"coding": [{"system": CODE_SYSTEM, "code": local_code("C", name), "display": name}], "text": name}


def _narrative(paragraphs: list[str]) -> dict:
    body = "".join(f"<p>{html.escape(p, quote=False)}</p>" for p in paragraphs)
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{body}</div>'}


def _conditional(resource_type: str, identifier: dict) -> dict:
    return {"method": "PUT", "url": f"{resource_type}?identifier="
                                    + quote(f"{identifier['system']}|{identifier['value']}", safe=":")}


def fhir_bundle(prediction: dict, study: StudyContext, issued: datetime | None = None) -> dict:
    """The transaction Bundle (a JSON dict) for one prediction dict (see the module's docstring)."""
    model, volume = study.model, study.volume
    header = getattr(volume, "dicom_headers", None)
    study_id = pseudonymous_study_id(prediction, volume)
    source = ([str(header.get("StudyInstanceUID", "") or ""), str(header.get("SeriesInstanceUID", "") or "")]
              if header is not None else [study_id])
    result = _uuid(*source, model.bundle_hash, "fhir")
    label, probabilities = prediction["prediction"], prediction["probabilities"]
    if label not in probabilities:
        raise MsnetError(f"predicted class {label!r} is not among the probabilities {list(probabilities)}",
                         getattr(volume, "source", None), "pass the prediction's own probabilities")
    issued = (issued or datetime.now(timezone.utc)).isoformat(timespec="seconds")

    device_id = {"system": BUNDLE_HASH_SYSTEM, "value": model.bundle_hash}
    device_url = f"urn:uuid:{_uuid(model.bundle_hash, 'fhir-device')}"
    device = {"resourceType": "Device", "identifier": [device_id], "status": "active", "manufacturer": "msnet",
              "deviceName": [{"name": model.name, "type": "model-name"}], "version": [{"value": model.version}],
              "type": {"text": "software: chest CT classifier (COVID-19 / CAP / normal), research use only"},
              "note": [{"text": RESEARCH_ONLY}, *([{"text": f"Intended use: {model.intended_use}"}]
                                                 if model.intended_use else [])]}
    entries = [{"fullUrl": device_url, "resource": device, "request": _conditional("Device", device_id)}]

    observations = []
    for name, p in probabilities.items():
        code = local_code("P", name)
        ident = {"system": UUID_SYSTEM, "value": f"urn:uuid:{_uuid(result, code)}"}
        obs = {"resourceType": "Observation", "identifier": [ident], "status": REPORT_STATUS,
               "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                         "code": "imaging", "display": "Imaging"}]}],
               "code": {"coding": [{"system": CODE_SYSTEM, "code": code, "display": f"Probability of {name}"}],
                        "text": f"Probability of {name} (msnet)"},
               "issued": issued,
               "valueQuantity": {"value": round(float(p), 6), "unit": "probability", "system": UCUM, "code": "1"},
               "device": {"reference": device_url, "display": f"{model.name} {model.version}"},
               "note": [{"text": RESEARCH_ONLY}]}
        observations.append(f"urn:uuid:{_uuid(result, code, 'entry')}")
        entries.append({"fullUrl": observations[-1], "resource": obs, "request": _conditional("Observation", ident)})

    warnings = [f"Warning: {w}" for w in prediction.get("warnings") or []]
    keys = [int(k["slice_index"]) for k in prediction.get("key_slices") or []]
    statement = (f"msnet result: {label} (probability {float(probabilities[label]):.3f}); "
                 f"model {model.name} {model.version}. {RESEARCH_ONLY}")
    paragraphs = [statement, *warnings, *([key_slice_text(volume, keys)] if keys else [])]
    report_ids = [{"system": STUDY_ID_SYSTEM, "value": study_id},
                  {"system": UUID_SYSTEM, "value": f"urn:uuid:{result}"}]
    report = {"resourceType": "DiagnosticReport", "identifier": report_ids, "status": REPORT_STATUS,
              "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                                        "display": "Radiology"}]}],
              "code": {"coding": [{"system": LOINC, "code": "24627-2", "display": "CT Chest"}],
                       "text": "CT chest: automated classification (msnet, research use only)"},
              "issued": issued, "result": [{"reference": u} for u in observations],
              "conclusion": " ".join(paragraphs), "conclusionCode": [_class_concept(label)],
              "text": _narrative(paragraphs)}
    entries.append({"fullUrl": f"urn:uuid:{result}", "resource": report,
                    "request": _conditional("DiagnosticReport", report_ids[1])})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def validate_r4(bundle: dict) -> None:
    """Check the Bundle and each of its resources against ``fhir.resources``' R4B models (the same
    elements as R4's for these resources); MsnetError on the first problem."""
    try:
        from fhir.resources.R4B import get_fhir_model_class  # optional: the ``fhir`` extra
    except ImportError as exc:
        raise MsnetError("FHIR output needs the fhir.resources package", fix="pip install 'msnet[fhir]'") from exc
    try:
        get_fhir_model_class("Bundle").model_validate(bundle)
        for entry in bundle.get("entry", []):
            get_fhir_model_class(entry["resource"]["resourceType"]).model_validate(entry["resource"])
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise MsnetError(f"the FHIR resources do not validate: {exc}",
                         fix="report this: msnet builds them (msnet/inference/writers/fhir.py)") from exc


@register_writer
class FHIRWriter(Writer):
    name = "fhir"
    needs = frozenset()
    summary = "FHIR R4 transaction Bundle: DiagnosticReport + one Observation per class + the model as Device"

    def prepare(self, out: Path | None) -> None:
        validate_r4({"resourceType": "Bundle", "type": "transaction"})  # the package is there, before any study

    def write(self, prediction: dict, study: StudyContext, out: Path) -> list[Path]:
        bundle = fhir_bundle(prediction, study)
        validate_r4(bundle)
        path = study_folder(out, prediction, study.volume) / FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(bundle, indent=2, allow_nan=False) + "\n")
        return [path]
