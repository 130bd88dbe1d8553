"""Files in and out: images read region by region, atomic files and directories, CSV, provenance."""

from defectscan.io.files import atomic_dir, atomic_path, csv_text, write_text
from defectscan.io.images import SUPPORTED_SUFFIXES, ImageSource, open_image, read_image, write_image
from defectscan.io.provenance import hardware, library_versions

__all__ = ["SUPPORTED_SUFFIXES", "ImageSource", "atomic_dir", "atomic_path", "csv_text", "hardware",
           "library_versions", "open_image", "read_image", "write_image", "write_text"]
