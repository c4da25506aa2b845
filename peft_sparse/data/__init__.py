"""Calibration windows and evaluation text: embedded offline corpus, local files, Hub datasets."""

from .calibration import load_calibration, sample_document_windows, sample_text_windows
from .sources import embedded_documents, embedded_text

__all__ = [
    "embedded_documents",
    "embedded_text",
    "load_calibration",
    "sample_document_windows",
    "sample_text_windows",
]
