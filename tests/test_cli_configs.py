"""Each option is declared once: for every pipeline (found in ``pipelines/``, so a new one cannot skip this),
its flags are the fields of its run config (``CONFIG``; ``PLAIN_FLAGS`` name the few that are not), with the
fields' defaults, and parsing no optional flag gives the config's default object."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import shlex
from dataclasses import MISSING, dataclass, fields
from typing import Literal

import pytest

import pipelines
from e2r.cli_config import command_line, config_parser, flag_default, option, parse_config

PIPELINES = sorted(m.name for m in pkgutil.iter_modules(pipelines.__path__) if not m.name.startswith("_"))


def parsers(parser: argparse.ArgumentParser) -> list[tuple[str | None, argparse.ArgumentParser]]:
    """``(None, parser)``, or ``(command, its parser)`` for each sub-command."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [(None, parser)] if not subs else [(name, p) for a in subs for name, p in a.choices.items()]


def command_dest(parser: argparse.ArgumentParser) -> str:
    """The config field a parser's sub-command is parsed into."""
    return next(a.dest for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def offered(cls: type, command: str | None) -> dict[str, object]:
    """The config's option fields offered by ``command``: {name: field}."""
    return {f.name: f for f in fields(cls) if "help" in f.metadata
            and ("commands" not in f.metadata or command in f.metadata["commands"])}


def sample(action: argparse.Action) -> str:
    """A value the action's type accepts."""
    return "8x8" if action.dest == "image_size" else "1" if action.type in (int, float) else "x"


def test_every_pipeline_is_found():
    assert {"train_teacher", "train_student", "eval_teacher", "eval_student", "export", "drive", "study", "demo",
            "make_dataset", "check_dataset", "import_calib", "retrieval_index"} <= set(PIPELINES)


@pytest.mark.parametrize("name", PIPELINES)
def test_flags_and_defaults_are_the_config_fields(name):
    module = importlib.import_module(f"pipelines.{name}")
    cls, plain = module.CONFIG, set(getattr(module, "PLAIN_FLAGS", ()))
    assert not plain & {f.name for f in fields(cls)}, "a flag that is a config field is declared by the field"
    parser = module.build_parser()
    parser.format_help()                                       # every help text formats (%(default)s, no stray %)
    for command, sub in parsers(parser):
        sub.format_help()
        actions = {a.dest: a for a in sub._actions if a.dest != "help"}
        want = offered(cls, command)
        assert set(actions) - plain == set(want), f"{name} {command or ''}: flags != config fields"
        argv, given = [command] if command else [], {command_dest(parser): command} if command else {}
        positional = []
        for dest, f in want.items():
            a = actions[dest]
            assert a.help == f.metadata.get("commands", {}).get(command, {}).get("help", f.metadata["help"])
            if flag_default(f) is MISSING or a.required:
                assert a.required or not a.option_strings, f"{name}: --{dest} has no default, so it is required"
                if a.option_strings:
                    argv += [a.option_strings[0], sample(a)]
                else:
                    positional.append(sample(a))
                given[dest] = None
            else:
                assert a.default == flag_default(f), f"{name}: --{dest} default {a.default!r} != {flag_default(f)!r}"
        ns = parser.parse_args(argv + positional)
        parsed = cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})
        assert parsed == cls(**{k: getattr(ns, k) for k in given}), f"{name}: [] does not parse to the defaults"


@pytest.mark.parametrize("name", ["train_student", "export", "drive", "study", "check_dataset"])
def test_command_line_parses_back_to_the_config(name):
    """The command a config is written back as (logs, the study) parses to that config."""
    module = importlib.import_module(f"pipelines.{name}")
    parser = module.build_parser()
    cfg = {"train_student": lambda c: c(data_root="d", train_segments=["a", "b"], kd_targets="worker", steps=3,
                                        memorybank="m b", no_progress=True, lr=0.5),
           "export": lambda c: c(data_root="d", split=["train", "valid"], store="s", retrieval_index=["state", "pose"],
                                 amp="bf16", overwrite=True),
           "drive": lambda c: c(data_root="d", policy=["expert", "t=a.pt"], segment=["s1"], time_limit=3.5),
           "study": lambda c: c(budgets=[1], ablations=["kd_action"], student_steps=9, no_drive=True),
           "check_dataset": lambda c: c(data_root="my data", splits=["a"], stride=2)}[name](module.CONFIG)
    ns = parser.parse_args(shlex.split(command_line(f"pipelines.{name}", cfg))[3:])
    assert module.CONFIG(**{f.name: getattr(ns, f.name) for f in fields(module.CONFIG)}) == cfg


def test_a_repeated_flag_replaces_its_default():
    @dataclass(kw_only=True)
    class Cfg:
        policy: list[str] = option(default_factory=lambda: ["expert"], repeat=True, help="policies")
        ks: list[int] = option(default_factory=lambda: [1, 2], help="numbers")
        mode: Literal["fast", "slow"] = option("fast", help="a choice")

    parser = config_parser(Cfg, "t", None)
    assert parse_config(Cfg, parser, []) == Cfg()
    assert parse_config(Cfg, parser, ["--policy", "a", "--policy", "b", "--ks", "3", "--mode", "slow"]) == \
        Cfg(policy=["a", "b"], ks=[3], mode="slow")
    with pytest.raises(SystemExit):
        parse_config(Cfg, parser, ["--mode", "medium"])
    assert parse_config(Cfg, parser, []) == Cfg(), "the parser's default list was changed by a parse"
