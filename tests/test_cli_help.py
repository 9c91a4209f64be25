"""The command line documents itself: every option of every `expertmap` subcommand has help text,
including the subcommands that other packages register (`expertmap bench`)."""

from __future__ import annotations

import argparse

from expertmap.cluster.cli import build_parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    return [
        "/".join(a.option_strings) or a.dest
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not (a.help or "").strip()
    ]


def test_every_subcommand_and_option_has_help():
    parser = build_parser()
    commands = _subcommands(parser)
    assert {"generate", "record", "serve", "bench"} <= set(commands), sorted(commands)
    missing = {"expertmap": _undocumented(parser)}
    missing.update({name: _undocumented(sub) for name, sub in commands.items()})
    assert not any(missing.values()), {k: v for k, v in missing.items() if v}
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    undescribed = [c.dest for c in action._choices_actions if not (c.help or "").strip()]
    assert not undescribed, undescribed


def test_the_help_check_finds_an_option_without_help():
    """The walk above is not vacuous: an option added without help is reported."""
    parser = build_parser()
    _subcommands(parser)["generate"].add_argument("--undocumented-option")
    assert _undocumented(_subcommands(parser)["generate"]) == ["--undocumented-option"]


def test_defaults_come_from_one_module():
    from expertmap.actors import defaults

    commands = _subcommands(build_parser())
    g = commands["generate"].parse_args(["--prompt", "x"])
    b = commands["bench"].parse_args([])
    assert (g.link, g.budget, g.policy, g.max_new_tokens) == (defaults.LINK, defaults.BUDGET, defaults.POLICY,
                                                             defaults.MAX_NEW_TOKENS)  # fmt: skip
    assert (b.link, b.budget, b.prefetch_distance, b.max_new_tokens) == (
        defaults.LINK, defaults.BUDGET, defaults.PREFETCH_DISTANCE, defaults.MAX_NEW_TOKENS)  # fmt: skip
    assert g.model == b.model == str(defaults.BUNDLED_MODEL)
