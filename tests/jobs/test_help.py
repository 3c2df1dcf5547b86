"""--help layout: jobs.score's and jobs.nightly's options in groups, each naming its default, and
blip-moderate's subcommands one line each. A flag added without a group fails here (and stops
make_parser, so every test that builds the parser fails with it)."""

from __future__ import annotations

import argparse
import importlib

import pytest

from jobs import cli, nightly, score


def _grouped_actions(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    return {group.title: group._group_actions for group in parser._action_groups}


@pytest.mark.parametrize("make_parser", [score.make_parser, nightly.make_parser], ids=["score", "nightly"])
def test_every_option_is_in_a_group_and_names_its_default(make_parser):
    groups = _grouped_actions(make_parser())
    assert [a.option_strings for a in groups.pop("options")] == [["-h", "--help"]]  # nothing left ungrouped
    assert groups.pop("positional arguments") == []
    assert set(groups) == set(score.GROUPS)
    silent = [a.option_strings[0] for actions in groups.values() for a in actions if not ("default" in a.help or "required" in a.help)]
    assert silent == []
    for title, actions in groups.items():
        assert all(score.OPTION_GROUPS[a.option_strings[0]] == title for a in actions)


def test_help_shows_the_groups_in_order_with_the_rarely_changed_knobs_last():
    text = score.make_parser().format_help()
    positions = [text.index(f"\n{title}:\n") for title in score.GROUPS]
    assert positions == sorted(positions)
    speed = text[positions[-1]:]
    for flag in ("--overlap", "--shape-buckets", "--torch-compile", "--vision-attention", "--cpu-kernels", "--decode-device"):
        assert flag in speed and flag not in text[: positions[-1]].split("\n\n", 1)[1]  # past the usage line
    assert text.startswith("usage: python -m jobs.score --input PATH --output PATH [options]\n")


def test_a_flag_without_a_group_stops_the_parser(monkeypatch):
    monkeypatch.setattr(score, "_OPTIONS", [*score._OPTIONS, ("--new-signal", "A new signal (default off).")])
    with pytest.raises(KeyError, match="--new-signal has no help group"):
        score.make_parser()


def test_grouping_changes_no_parsed_value():
    args = vars(score.make_parser().parse_args(["--input", "i", "--output", "o", "--overlap", "on", "--no-dedup", "--json"]))
    assert args == {"input": "i", "output": "o", "overlap": "on", "dedup": False, "json": True}


def test_blip_moderate_help_lists_each_subcommand_on_one_line(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (module, line) in cli.COMMANDS.items():
        assert f"  {name:<8} {line}\n" in out + "\n"
        assert callable(importlib.import_module(module).main)
    assert cli.main([]) == 2 and cli.main(["bogus"]) == 2
    assert "subcommands" in capsys.readouterr().err
