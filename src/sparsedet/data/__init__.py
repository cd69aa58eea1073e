"""Datasets. Importing the package registers the built-in dataset formats (``formats.py``)."""
from . import coco, yolo  # noqa: F401 (each registers its format)
