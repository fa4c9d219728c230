"""Imports every pass module so that each registers itself."""

from passes import cleanup

__all__ = ["cleanup"]
