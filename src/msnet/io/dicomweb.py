"""Studies on a DICOMweb server (WADO-RS): read one the way a folder is read.

A study URL is ``http(s)://HOST[:PORT]/PREFIX/studies/<StudyInstanceUID>``, optionally followed by
``/series/<SeriesInstanceUID>``. The study's metadata (no pixels) is fetched first and the series is
chosen by the same rule as for a folder (:mod:`msnet.io.dicom`); only that series' instances are then
fetched, in whatever transfer syntax the server holds them (``transfer-syntax=*``: no transcoding on
the server), streamed one instance at a time into a temporary folder that is removed once the
volume is read. Sorting, decoding, warnings and errors are those of a folder.

Credentials come from the environment, never from the URL or the command line:
``MSNET_DICOMWEB_TOKEN`` (bearer) or ``MSNET_DICOMWEB_USER`` + ``MSNET_DICOMWEB_PASSWORD`` (basic).
A failed connection, a timeout or a 5xx/408/429 answer is retried a bounded number of times
(:data:`ATTEMPTS`, waiting 1, 2, 4 ... s) and then raised as :class:`MsnetError` naming the URL.

>>> parse_study_url("http://pacs:8042/dicom-web/studies/1.2.3/series/4.5").series_uid
'4.5'
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from msnet.errors import MsnetError
from msnet.io.dicom import _choose_series, read_dicom, read_header
from msnet.io.volume import CTVolume
from msnet.retry import Backoff

logger = logging.getLogger(__name__)

ATTEMPTS = 3
"""Tries per request before a network failure is reported."""
WAIT_S = 1.0
"""First wait between tries; doubled after each."""
TIMEOUT_S = (10.0, 120.0)
"""(connect, read) timeout of every request."""
ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)
_URL_FORM = "http(s)://HOST[:PORT]/PREFIX/studies/<StudyInstanceUID>[/series/<SeriesInstanceUID>]"
_URL_RE = re.compile(r"^(?P<base>https?://[^?#]+?)/studies/(?P<study>[^/?#]+)(?:/series/(?P<series>[^/?#]+))?/?$",
                     re.IGNORECASE)
_AUTH_FIX = "set MSNET_DICOMWEB_TOKEN, or MSNET_DICOMWEB_USER and MSNET_DICOMWEB_PASSWORD"
T = TypeVar("T")


@dataclass(frozen=True)
class StudyRef:
    """Where a study lives on a DICOMweb server."""

    base_url: str
    study_uid: str
    series_uid: str | None = None


def is_dicomweb_url(text: str | Path) -> bool:
    """True for an http(s) URL (a Path has lost its ``//`` and is never one).

    >>> is_dicomweb_url("https://pacs/dicom-web/studies/1.2"), is_dicomweb_url("/data/study")
    (True, False)
    """
    return isinstance(text, str) and text.lower().startswith(("http://", "https://"))


def _refuse_userinfo(url: str) -> None:
    from urllib.parse import urlsplit

    if urlsplit(url).username is not None or "@" in urlsplit(url).netloc:
        raise MsnetError("credentials in the URL are not accepted (they would end up in logs and shell history)",
                         _strip_userinfo(url), _AUTH_FIX)


def _strip_userinfo(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//", url, count=1)


def parse_study_url(url: str) -> StudyRef:
    """Split a study (or series) URL into the service's base URL and the UIDs."""
    _refuse_userinfo(url)
    m = _URL_RE.match(url.strip())
    if m is None:
        raise MsnetError("not a DICOMweb study URL", url, f"use {_URL_FORM}")
    return StudyRef(m["base"].rstrip("/"), m["study"], m["series"])


def service_url(url: str) -> str:
    """The service's base URL from a base URL or a study/series URL (for storing results)."""
    _refuse_userinfo(url)
    m = _URL_RE.match(url.strip())
    return (m["base"] if m else url.strip()).rstrip("/")


def _session():
    """A requests session with the environment's credentials (and the headers to send with it)."""
    import requests

    session = requests.Session()
    headers = {}
    token = os.environ.get("MSNET_DICOMWEB_TOKEN")
    user = os.environ.get("MSNET_DICOMWEB_USER")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif user:
        session.auth = (user, os.environ.get("MSNET_DICOMWEB_PASSWORD", ""))
    return session, headers


def not_dicomweb(url: str) -> MsnetError | None:
    """Why ``url``'s service is not a DICOMweb endpoint, as an error to raise; None when it answers a QIDO-RS
    search (``GET BASE/studies?limit=1``) as DICOMweb does: 204, or 200 with a JSON list of DICOM JSON
    objects. An Orthanc REST URL answers a list of Orthanc ids, a viewer or another web page HTML.

    e.g. not_dicomweb("http://pacs:8042")   # Orthanc's REST API
    MsnetError('http://pacs:8042: this is not a DICOMweb endpoint (... Orthanc REST API ...)')
    """
    import requests

    base = service_url(url)
    session, headers = _session()
    try:
        r = session.get(f"{base}/studies", params={"limit": "1"}, timeout=TIMEOUT_S,
                        headers={**headers, "Accept": "application/dicom+json"})
    except requests.RequestException:
        return None  # unreachable: the caller's own error says so
    if r.status_code in (401, 403):
        return None
    server = r.headers.get("Server", "")
    kind = r.headers.get("Content-Type", "").split(";")[0].strip() or "no content type"
    if r.status_code == 204:
        return None
    if r.status_code == 200:
        try:
            body = r.json()
        except ValueError:
            body = None
        if isinstance(body, list) and all(isinstance(x, dict) for x in body):
            return None
        what = ("a list of Orthanc ids: the Orthanc REST API" if isinstance(body, list) and body
                and all(isinstance(x, str) for x in body) else f"{kind}, not DICOM JSON")
    else:
        what = f"HTTP {r.status_code} to a QIDO-RS search, {kind}"
    if "Orthanc REST API" in what or "orthanc" in server.lower() or _is_orthanc(session, headers, base):
        origin = re.match(r"^https?://[^/]+", base)[0]
        fix = (f"use the URL of Orthanc's DICOMweb plugin, e.g. {origin}/dicom-web (package orthanc-dicomweb, "
               "\"DicomWeb\": {\"Enable\": true, \"Root\": \"/dicom-web/\"} in its configuration); Orthanc's own "
               "REST API and its web viewers are not DICOMweb")
    else:
        fix = f"use the server's DICOMweb (WADO-RS/STOW-RS) base URL, not a viewer's or REST API's: {_URL_FORM}"
    return MsnetError(f"this is not a DICOMweb endpoint ({what})", base, fix)


def _is_orthanc(session, headers: dict, base: str) -> bool:
    """Whether the server at ``base`` is an Orthanc (its REST API's ``/system`` names its version)."""
    import requests

    origin = re.match(r"^https?://[^/]+", base)
    try:
        r = session.get(f"{origin[0]}/system", headers=headers, timeout=TIMEOUT_S)
        body = r.json() if r.status_code == 200 else {}
    except (requests.RequestException, ValueError, TypeError):
        return False
    return isinstance(body, dict) and "ApiVersion" in body and "DicomAet" in body


def client(base_url: str):
    """A ``dicomweb_client.DICOMwebClient`` with the environment's credentials; its own retries off
    (:func:`retrying` does them, for connection errors too)."""
    from dicomweb_client.api import DICOMwebClient

    session, headers = _session()
    web = DICOMwebClient(base_url, session=session, headers=headers, timeout=TIMEOUT_S)
    web.set_http_retry_params(retry=False)
    return web


def retrying(what: str, url: str, fn: Callable[[], T], attempts: int | None = None) -> T:
    """``fn()``, tried again on network failures and 5xx/408/429 answers; other answers fail at once.
    An answer that DICOMweb would not give (HTML or other JSON where DICOM JSON was due, 404/405/400
    from a server that does not answer a QIDO-RS search) fails as "this is not a DICOMweb endpoint"."""
    import requests

    attempts = attempts or ATTEMPTS
    last: Exception | None = None
    for k in range(attempts):
        try:
            return fn()
        except (ValueError, KeyError, TypeError) as exc:  # the answer could not be parsed as DICOMweb's
            raise (not_dicomweb(url) or MsnetError(
                f"{what}: the server's answer is not DICOMweb ({type(exc).__name__}: {exc})", url,
                "check that the URL is the server's DICOMweb base URL")) from exc
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code in (400, 404, 405, 406, 415):
                wrong = not_dicomweb(url)
                if wrong is not None:
                    raise wrong from exc
            if code == 404:
                raise MsnetError(f"{what}: not found on the server (HTTP 404)", url,
                                 "check the UIDs in the URL (QIDO: GET BASE/studies?PatientID=...)") from exc
            if code in (401, 403):
                raise MsnetError(f"{what}: HTTP {code}, not authorised", url, _AUTH_FIX) from exc
            if code and code < 500 and code not in (408, 429):
                raise MsnetError(f"{what}: HTTP {code} ({exc.response.reason})", url,
                                 "check the URL and the server's DICOMweb configuration") from exc
            last = exc
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            last = exc
        if k + 1 < attempts:
            logger.warning("%s: %s, trying again (%d of %d)", what, type(last).__name__, k + 2, attempts)
            time.sleep(Backoff(WAIT_S).delay(k + 1))
    raise MsnetError(f"{what} failed after {attempts} tries ({type(last).__name__}: {last})", url,
                     "check that the server is up and reachable from here, then run again") from last


def _metadata_headers(web, ref: StudyRef, url: str) -> list:
    from pydicom import Dataset

    meta = retrying("study metadata", url, lambda: web.retrieve_study_metadata(ref.study_uid))
    headers = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bulk data URIs (pixel data) are left out on purpose
        for k, item in enumerate(meta):
            headers.append((Path(f"instance-{k}"), Dataset.from_json(item, bulk_data_uri_handler=lambda *a: b"")))
    return headers


def _download(web, ref: StudyRef, series_uid: str, folder: Path) -> int:
    for old in folder.iterdir():  # a retry starts from scratch
        old.unlink()
    n = 0
    for ds in web.iter_series(ref.study_uid, series_uid, media_types=ANY_TRANSFER_SYNTAX):
        ds.save_as(folder / f"{n:06d}.dcm", enforce_file_format=False)
        n += 1
    return n


def read_dicomweb(url: str, series: str | int | None = None, study_id: str | None = None) -> CTVolume:
    """Read the CT series of a DICOMweb study (chosen like a folder's) into a :class:`CTVolume`.

    The study id defaults to the StudyInstanceUID; ``volume.source`` is the URL.

    e.g. vol = read_dicomweb("http://localhost:8042/dicom-web/studies/1.2.3")
    """
    ref = parse_study_url(url)
    web = client(ref.base_url)
    notes: list[str] = []
    n_series = 1
    if ref.series_uid is not None:
        if series is not None and str(series) != ref.series_uid:
            raise MsnetError(f"series {series!r} asked for, but the URL names series {ref.series_uid}", url,
                             "drop --series or the /series/ part of the URL")
        series_uid = ref.series_uid
    else:
        headers = _metadata_headers(web, ref, url)
        if not headers:
            raise MsnetError("the study holds no instances", url, "check the StudyInstanceUID")
        chosen, notes, n_series = _choose_series(headers, series, url)
        series_uid = chosen["uid"]
    with tempfile.TemporaryDirectory(prefix="msnet-dicomweb-") as tmp:
        folder = Path(tmp)
        n = retrying("series download", url, lambda: _download(web, ref, series_uid, folder))
        if n == 0:
            raise MsnetError(f"series {series_uid} has no instances", url, "check the SeriesInstanceUID")
        pairs = [(f, read_header(f)) for f in sorted(folder.iterdir())]
        logger.debug("fetched %d instances of series %s", n, series_uid)
        vol = read_dicom([p for p in pairs if p[1] is not None], [f for f, h in pairs if h is None], url,
                         study_id or ref.study_uid, series_uid)
    vol.warnings[:0] = notes
    vol.n_series = n_series
    return vol
