"""msnet: Multi-Slice Net for patient-level chest CT diagnosis."""

__version__ = "0.1.0"

CLASSES: tuple[str, ...] = ("COVID-19", "CAP", "NORMAL")
"""Default class order, kept everywhere (stored in every checkpoint)."""
