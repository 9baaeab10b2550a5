"""YAML config files as argparse defaults: the file sets them, command-line flags override.

A config file has one section per entry point (`etl:`, `train:`), whose keys are the
entry point's long flag names (`image-size` or `image_size`).
"""
from __future__ import annotations

import argparse

import yaml


def parse_args(parser: argparse.ArgumentParser, section: str, argv=None) -> argparse.Namespace:
    parser.add_argument("--config", help=f"YAML file whose '{section}:' section sets defaults for these flags")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        with open(known.config) as handle:
            values = (yaml.safe_load(handle) or {}).get(section) or {}
        destinations = {action.dest for action in parser._actions}
        values = {key.replace("-", "_"): value for key, value in values.items()}
        unknown = sorted(set(values) - destinations)
        if unknown:
            parser.error(f"{known.config}: unknown keys in '{section}:' {unknown}; valid: {sorted(destinations)}")
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def dump_config(args: argparse.Namespace, path) -> None:
    """Write the resolved arguments, so every output says how it was made."""
    with open(path, "w") as handle:
        yaml.safe_dump(vars(args), handle, sort_keys=True)
