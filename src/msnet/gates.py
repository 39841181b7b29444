"""The gates before any diagnosis: is this a chest CT with lungs in it?

:func:`check_lungs` refuses a volume without (enough) lung; the checks are built on the lung mask of
:mod:`msnet.lungs`. Grey-level images (no HU) are not gated here.
"""

from __future__ import annotations

from msnet.errors import MsnetError
from msnet.lungs import MIN_LUNG_ML, LungStats, lung_stats


def check_lungs(vol, stats: LungStats | None = None) -> LungStats | None:
    """The lung gate for a :class:`msnet.io.CTVolume`: stats, or MsnetError when it shows no (or too little) lung.

    Grey-level image volumes (kind ``grey``: screenshots, no HU) are not gated: None. When the scan
    cuts the lungs (apices or bases missing), ``stats.warnings`` says so; the caller passes it on.
    ``stats``: this volume's :func:`lung_stats`, when already computed.

    e.g. stats = check_lungs(vol)
    e.g. prediction_warnings += stats.warnings if stats else []
    """
    if getattr(vol, "kind", "hu") != "hu":
        return None
    if stats is None:
        stats = lung_stats(vol.hu, vol.spacing_mm, getattr(vol, "z_mm", None))
    stats.warnings = []
    sid = vol.study_id
    fix = ("pass a chest CT series that covers the lungs (a lung or mediastinal reconstruction, not a scout, "
           "an abdomen or a head scan)")
    if not stats.found:
        raise MsnetError(f"study {sid}: no lungs found (no aerated, lung-like region inside the body), so no "
                         "diagnosis is made", fix=fix)
    if stats.volume_ml < MIN_LUNG_ML:
        raise MsnetError(f"study {sid}: only {stats.volume_ml:.0f} ml of lung found in slices {stats.first_slice}-"
                         f"{stats.last_slice} of {stats.n_slices} (a diagnosis needs at least {MIN_LUNG_ML:.0f} ml; "
                         f"adult lungs hold 3-7 l), so no diagnosis is made", fix=fix)
    missing = [part for part, cut in (("apices (top)", stats.cut_top), ("bases (bottom)", stats.cut_bottom)) if cut]
    if missing:
        stats.warnings.append(f"the scan covers only part of the lungs: it cuts off the lung {' and '.join(missing)}"
                              f" ({stats.volume_ml:.0f} ml of lung in the scan); the diagnosis sees only that part")
    return stats


