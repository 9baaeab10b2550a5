"""YAML config files as argparse defaults: the file sets them, command-line flags override.

A config file has one section per entry point (`etl:` for etl/preprocess.py, `train:` for training/train.py,
`sweep:` for training/sweep.py), whose keys are the entry point's long flag names (`batch-size` or `batch_size`).
"""
from __future__ import annotations

import argparse

import yaml


def destinations(parser: argparse.ArgumentParser) -> set[str]:
    """The names a parser can set: one per argument (its dest), plus any parser-level set_defaults() names.

    argparse has no public list of a parser's arguments (`parser._actions` is private), but parsing an empty
    command line is public and yields a namespace with exactly these names: every argument's default and every
    set_defaults() value. Arguments whose default is argparse.SUPPRESS (--help) are left out, rightly: they hold no
    setting. Parsing [] also runs each `type` on a string default, as any parse does. The parser must have no
    required arguments (parsing [] would stop with a usage error); an entry point that reads a config file has
    none, since the file may be what gives them."""
    return set(vars(parser.parse_known_args([])[0]))


def given_destinations(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The names that `argv` itself sets: a flag given with its default value counts, as do abbreviated and
    --flag=value forms; what the parser does not know is ignored. The parser is left as it was.

    argparse says which flags were given only through the namespace it fills, so this parses `argv` into a
    namespace that records the names argparse sets. That namespace starts with every name of the parser set to
    None, so that argparse fills in no default (it applies one only where the namespace lacks the name) and
    converts none after parsing (it converts a string default only where the namespace still holds that very
    string); append and count actions start from None as they do from a missing name. A positional argument that
    may take no values (nargs '?', '*' or REMAINDER) is always set, so it always counts."""
    set_while_parsing: set[str] = set()

    class RecordingNamespace(argparse.Namespace):
        def __setattr__(self, name, value):
            set_while_parsing.add(name)
            super().__setattr__(name, value)

    namespace = RecordingNamespace(**dict.fromkeys(destinations(parser)))
    set_while_parsing.clear()  # the names set to None above
    parser.parse_known_args(argv, namespace)
    return set_while_parsing


def parse_args(parser: argparse.ArgumentParser, section: str, argv=None) -> argparse.Namespace:
    parser.add_argument("--config", help=f"YAML file whose '{section}:' section sets defaults for these flags")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        with open(known.config) as handle:
            values = (yaml.safe_load(handle) or {}).get(section) or {}
        valid = destinations(parser)
        values = {key.replace("-", "_"): value for key, value in values.items()}
        unknown = sorted(set(values) - valid)
        if unknown:
            parser.error(f"{known.config}: unknown keys in '{section}:' {unknown}; valid: {sorted(valid)}")
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def dump_config(args: argparse.Namespace, path) -> None:
    """Write the resolved arguments, so every output says how it was made."""
    with open(path, "w") as handle:
        yaml.safe_dump(vars(args), handle, sort_keys=True)
