"""Dataset sources: each turns a download, as users get it, into a manifest (no pixels).

A source is a small module with `LABEL_NAMES` and `build_manifest(data_root, **options)`
returning a :class:`etl.sources.manifest.Manifest`; its module name is its `--source` name. (The dicom
source has no fixed `LABEL_NAMES`: its labels are the columns of the user's label CSV.)
Optionally, `side_tables(data_root)` returns tables the ETL writes beside the dataset.
"""
import importlib
import inspect
import pkgutil

# Every module here but the manifest, found by name and imported when asked for: chexpert imports
# etl.uncertainty, which imports this package's manifest module, so importing every source here would make
# `cxr-relabel` (etl.uncertainty) import itself half-loaded.
SOURCES = tuple(sorted(module.name for module in pkgutil.iter_modules(__path__) if module.name != "manifest"))


def get_source(name: str):
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; choose one of {sorted(SOURCES)}")
    return importlib.import_module(f"{__name__}.{name}")


def manifest_options(name: str, given: dict) -> dict:
    """The options given (None and False left out) for source `name`; ValueError naming the
    ones it does not take (--frontal-only with --source nih, say)."""
    options = {key: value for key, value in given.items() if value is not None and value is not False}
    accepted = inspect.signature(get_source(name).build_manifest).parameters
    wrong = sorted(key for key in options if key not in accepted)
    if wrong:
        flags = ", ".join("--" + key.replace("_", "-") for key in wrong)
        raise ValueError(f"{flags} {'does' if len(wrong) == 1 else 'do'} not apply to --source {name}")
    return options


def label_manifest(name: str, data_root, **options):
    """The manifest of every label row, image file present or not, for analyses that need no
    pixels (sources that read labels from image files still need the files)."""
    options = manifest_options(name, options)
    if "check_images" in inspect.signature(get_source(name).build_manifest).parameters:
        options["check_images"] = False
    return get_source(name).build_manifest(data_root, **options)


def side_tables(name: str, data_root) -> dict:
    """name -> DataFrame of the tables the source keeps beside the dataset (NIH: bounding boxes)."""
    source = get_source(name)
    return source.side_tables(data_root) if hasattr(source, "side_tables") else {}
