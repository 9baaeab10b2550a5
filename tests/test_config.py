"""cxr_pipeline/config.py: a config file's section as argparse defaults, and the two questions about a parser that
argparse answers only through parsing: which names it can set, and which of them a command line sets."""
import argparse

import pytest
import yaml

from conftest import ROOT
from cxr_pipeline.config import destinations, given_destinations, parse_args

CONFIGS = sorted((ROOT / "conf").glob("**/*.yaml"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--run-id")
    parser.add_argument("--split-fractions", type=lambda text: [float(part) for part in text.split(",")],
                        default="0.7,0.1,0.2")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--tag", action="append", default=["base"])
    parser.add_argument("-v", "--verbose", action="count")
    parser.add_argument("--mode", choices=["a", "b"], default="a")
    parser.set_defaults(origin="defaults")
    return parser


def test_destinations_are_every_argument_and_parser_default_but_not_help():
    assert destinations(build_parser()) == {"batch_size", "run_id", "split_fractions", "channels_last", "tag",
                                            "verbose", "mode", "origin"}


@pytest.mark.parametrize("argv, given", [
    ([], set()),
    (["--batch-size", "16", "--mode", "a"], {"batch_size", "mode"}),  # given with the default value: given
    (["--batch=8", "--run", "x"], {"batch_size", "run_id"}),  # abbreviated, --flag=value
    (["--split-fractions", "0.8,0.1,0.1", "--channels-last"], {"split_fractions", "channels_last"}),
    (["--tag", "x", "--tag", "y", "-vv"], {"tag", "verbose"}),  # append and count work from nothing
    (["--unknown", "1", "--run-id", "x"], {"run_id"}),  # what the parser does not know is ignored
])
def test_given_destinations_are_the_names_the_command_line_sets(argv, given):
    parser = build_parser()
    assert given_destinations(parser, argv) == given
    # the parser is left as it was: a real parse still sees every default
    assert vars(parser.parse_args([])) == {"batch_size": 16, "run_id": None, "split_fractions": [0.7, 0.1, 0.2],
                                           "channels_last": False, "tag": ["base"], "verbose": None, "mode": "a",
                                           "origin": "defaults"}


def test_given_destinations_stops_on_a_value_the_parser_refuses_as_a_real_parse_does():
    with pytest.raises(SystemExit) as refused:
        given_destinations(build_parser(), ["--batch-size", "many"])
    assert refused.value.code == 2


def test_a_config_section_sets_defaults_that_flags_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"train": {"batch-size": 4, "run_id": "from-file"}, "etl": {"size": 64}}))
    args = parse_args(build_parser(), "train", ["--config", str(config), "--run-id", "from-flag"])
    assert (args.batch_size, args.run_id, args.config) == (4, "from-flag", str(config))


def test_a_config_key_no_flag_matches_is_refused_with_the_valid_ones(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"train": {"batch-size": 4, "image-size": 64, "help": True}}))
    with pytest.raises(SystemExit) as refused:
        parse_args(build_parser(), "train", ["--config", str(config)])
    assert refused.value.code == 2
    message = capsys.readouterr().err
    assert "unknown keys in 'train:' ['help', 'image_size']" in message
    assert "valid: ['batch_size', 'channels_last', 'config', 'mode', 'origin', 'run_id', 'split_fractions', " \
           "'tag', 'verbose']" in message


@pytest.mark.parametrize("config", CONFIGS, ids=[str(path.relative_to(ROOT / "conf")) for path in CONFIGS])
def test_every_section_of_every_config_file_is_one_entry_point_s_flags(config):
    """A section per entry point (etl:, train:, sweep:), each key one of its flags, so no config file rots."""
    from cxr_pipeline.etl.preprocess import build_parser as etl_parser
    from cxr_pipeline.training.sweep import build_parser as sweep_parser
    from cxr_pipeline.training.train import build_parser as train_parser

    parsers = {"etl": etl_parser, "train": train_parser, "sweep": sweep_parser}
    sections = yaml.safe_load(config.read_text())
    assert sections and set(sections) <= set(parsers), sorted(sections)
    for section in sections:
        parse_args(parsers[section](), section, ["--config", str(config)])
