"""One way out: every result file msnet writes, as a registered writer (see :mod:`.base`).

Registered here (importing a module registers its writers): ``sr``, ``ko``, ``sc`` (DICOM, into the
source study: :mod:`.dicom`) and ``fhir`` (an R4 DiagnosticReport Bundle: :mod:`.fhir`), one per study;
and the run's tables ``jsonl`` and ``csv`` (:mod:`.tables`: ``predictions.jsonl``, ``.csv``, ``.json``,
``status.csv``), which ``predict --out`` writes through :func:`.tables.run_writers`. A new output is
one module with a ``@register_writer`` (or ``@register_run_writer``) class, imported below.
"""

from msnet.inference.writers.base import (WRITERS, StudyContext, Writer, get_writer, register_writer, study_folder,
                                          write_outputs)
from msnet.inference.writers.dicom import DICOM
from msnet.inference.writers import fhir  # noqa: F401  (registers "fhir")
from msnet.inference.writers.tables import RUN_WRITERS, RunWriter, register_run_writer, run_writers

__all__ = ["RUN_WRITERS", "RunWriter", "register_run_writer", "run_writers", "WRITERS", "DICOM", "StudyContext",
           "Writer", "get_writer", "register_writer", "study_folder", "write_outputs"]
