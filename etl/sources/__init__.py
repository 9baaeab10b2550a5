"""Dataset sources: each turns a download, as users get it, into a manifest (no pixels).

A source is a small module with `LABEL_NAMES` and `build_manifest(data_root, **options)`
returning a :class:`etl.sources.manifest.Manifest`. Register it in `SOURCES`.
"""
from etl.sources import nih, pneumonia

SOURCES = {"nih": nih, "pneumonia": pneumonia}


def get_source(name: str):
    try:
        return SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown source {name!r}; choose one of {sorted(SOURCES)}") from None
