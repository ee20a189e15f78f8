"""Command lines derived from typed configs: each option is declared once, as a dataclass field made by
:func:`option` (its default and help text), and a pipeline's argparse parser is built from the fields.

    @dataclass(kw_only=True)
    class DriveConfig:
        data_root: str = option(help="synthetic dataset root")                     # required: no default
        starts: int = option(8, help="cars per track (default %(default)s)")       # --starts N, type int
        policy: list[str] = option(default_factory=lambda: ["expert"], repeat=True, help="...")
        no_progress: bool = option(False, help="hide the progress bar")            # --no_progress

    parser = config_parser(DriveConfig, "python -m pipelines.drive", __doc__)
    cfg = parse_config(DriveConfig, parser, argv)                                   # checked DriveConfig

The flag is ``--<field name>`` (``dest`` = the field); its default is the field's; its type comes from the
annotation: ``int`` / ``float`` / ``str``, ``bool`` (a ``store_true`` flag), ``Optional[X]``, ``Literal[...]``
(choices) and ``list[X]`` (``nargs="+"``). What an annotation cannot say goes in ``option``'s keywords (see
:data:`CLI_KEYS`). ``%(default)s`` in a help text shows the default, so a help text never repeats it.
"""
from __future__ import annotations

import argparse
import shlex
import types
import typing
from dataclasses import MISSING, Field, field, fields
from typing import Any, Literal, Optional, Sequence, TypeVar, Union

__all__ = ["CLI_KEYS", "option", "redefault", "add_options", "config_parser", "parse_config", "config_from_namespace",
           "flag_default", "command_line", "subcommand_parser", "num_features", "image_size",
           "lidar_num_features_option", "device_option"]

C = TypeVar("C")

#: what :func:`option` takes besides the default and the help text: ``flags`` (more option strings, e.g. an
#: older name), ``type`` (a parse function, for annotations argparse cannot follow), ``choices``, ``nargs``,
#: ``metavar``, ``repeat`` (a list flag given once per value), ``required`` (a flag that must be given although
#: the field has a default), ``positional`` (no ``--``), ``group`` (its section of ``--help``), ``exclusive``
#: (a name shared by flags that exclude each other), ``commands`` (sub-commands offering it: {name: overrides})
CLI_KEYS = frozenset({"flags", "type", "choices", "nargs", "metavar", "repeat", "required", "positional", "group",
                      "exclusive", "commands"})


def option(default: Any = MISSING, *, help: str, default_factory: Any = MISSING, **cli: Any) -> Any:
    """A config field that is also the command-line flag ``--<field name>`` (module docstring)."""
    unknown = set(cli) - CLI_KEYS
    if unknown:
        raise TypeError(f"option(): unknown keywords {sorted(unknown)}; known: {sorted(CLI_KEYS)}")
    return field(default=default, default_factory=default_factory, metadata={"help": help, **cli})


def redefault(cls: type, name: str, default: Any) -> Any:
    """Field ``name`` of the config ``cls`` with another default (a subclass's own), the rest as declared."""
    base = next(f for f in fields(cls) if f.name == name)
    return field(default=default, metadata=base.metadata)


def flag_default(f: Field) -> Any:
    """The field's default (a fresh one for a ``default_factory``); MISSING for a required field."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def is_repeated(f: Field) -> bool:
    """Whether the list field's flag is given once per value (``--split a --split b``)."""
    return bool(f.metadata.get("repeat"))


def is_positional(f: Field) -> bool:
    return bool(f.metadata.get("positional"))


class _AppendFresh(argparse._AppendAction):
    """``action="append"`` that starts a new list at the first value instead of appending to the default."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        if getattr(namespace, self.dest, None) is self.default:
            setattr(namespace, self.dest, None)
        super().__call__(parser, namespace, values, option_string)


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """``(X, is_list)`` for ``X``, ``Optional[X]``, ``list[X]``, ``Sequence[X]`` (and Optional of those)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else tp
    if typing.get_origin(tp) in (list, Sequence, typing.get_origin(Sequence[str])):
        return typing.get_args(tp)[0], True
    return tp, False


def _argument(f: Field, tp: Any, meta: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """``add_argument``'s option strings and keywords for field ``f`` of type ``tp``."""
    kw: dict[str, Any] = {"help": meta["help"]}
    default = flag_default(f)
    names = [f.name] if meta.get("positional") else [f"--{f.name}", *meta.get("flags", ())]
    if not meta.get("positional"):
        kw["dest"] = f.name
    if default is MISSING:
        if not meta.get("positional"):
            kw["required"] = True
    else:
        kw["default"] = default
    if meta.get("required"):
        kw["required"] = True
    if tp is bool:
        if default is not False:
            raise TypeError(f"{f.name}: a bool option is a flag that switches on, so its default must be False")
        kw["action"] = "store_true"
        return names, kw
    item, many = _unwrap(tp)
    if many:
        kw["action" if meta.get("repeat") else "nargs"] = _AppendFresh if meta.get("repeat") else "+"
    if typing.get_origin(item) is Literal:
        kw["choices"] = typing.get_args(item)
    elif item in (int, float):
        kw["type"] = item
    elif item is not str and "type" not in meta:
        raise TypeError(f"{f.name}: give option(type=...) to parse a {tp}")
    kw.update({k: meta[k] for k in ("type", "choices", "nargs", "metavar") if k in meta})
    return names, kw


def add_options(parser: argparse.ArgumentParser, cls: type, command: Optional[str] = None) -> None:
    """Add a flag to ``parser`` for every field of the config ``cls`` made by :func:`option` (module docstring);
    with ``command``, the fields offered by that sub-command only (``option(commands=...)``), with its overrides."""
    hints = typing.get_type_hints(cls)
    sections: dict[str, Any] = {}
    for f in fields(cls):
        if "help" not in f.metadata:
            continue
        meta = dict(f.metadata)
        if "commands" in meta:
            if command not in meta["commands"]:
                continue
            meta.update(meta["commands"][command])
        names, kw = _argument(f, hints[f.name], meta)
        target: Any = parser
        if "group" in meta:
            if meta["group"] not in sections:
                sections[meta["group"]] = parser.add_argument_group(meta["group"])
            target = sections[meta["group"]]
        if "exclusive" in meta:
            key = "exclusive " + meta["exclusive"]
            if key not in sections:
                sections[key] = target.add_mutually_exclusive_group()
            target = sections[key]
        target.add_argument(*names, **kw)


def config_parser(cls: type, prog: str, description: Optional[str], **kwargs: Any) -> argparse.ArgumentParser:
    """A parser (``--help`` keeps the description's layout) with the flags of the config ``cls``."""
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    parser = argparse.ArgumentParser(prog=prog, description=description, **kwargs)
    add_options(parser, cls)
    return parser


def subcommand_parser(cls: type, prog: str, doc: str, commands: dict[str, str], dest: str = "command"
                      ) -> argparse.ArgumentParser:
    """A parser whose sub-commands (``commands``: {name: help}) each offer the fields of the config ``cls``
    that ``option(commands=...)`` gives them; the sub-command is parsed into the field ``dest``. ``doc``'s
    first paragraph is the description, the rest the epilog."""
    head, _, rest = doc.partition("\n\n")
    parser = argparse.ArgumentParser(prog=prog, description=head, epilog=rest,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest=dest, required=True, metavar="{" + ",".join(commands) + "}")
    for command, text in commands.items():
        add_options(sub.add_parser(command, help=text, description=text), cls, command)
    return parser


def config_from_namespace(cls: type[C], ns: argparse.Namespace) -> C:
    """The config ``cls`` from parsed flags: every dataclass field is taken from the attribute of that name
    (a flag that a pipeline does not offer keeps the field's default); the config then checks itself."""
    values = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
    cfg = cls(**values)
    check = getattr(cfg, "check", None)
    if check is not None:
        check()
    return cfg


def parse_config(cls: type[C], parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> C:
    """``argv`` parsed by ``parser`` into the checked config ``cls``."""
    return config_from_namespace(cls, parser.parse_args(argv))


def num_features(text: str) -> Union[int, str]:
    """``--lidar_num_features``: ``"auto"`` or a column count (4, 5, 8)."""
    if text == "auto":
        return text
    if text in ("4", "5", "8"):
        return int(text)
    raise argparse.ArgumentTypeError(f"--lidar_num_features must be 4, 5, 8 or auto, got {text!r}")


def lidar_num_features_option() -> Any:
    """The ``lidar_num_features`` field of every config that reads point clouds."""
    return option("auto", type=num_features,
                  help="float32 features per point in .bin files: 4, 5, 8 or auto (decided per segment from file "
                       "sizes and values; default auto)")


def device_option() -> Any:
    """The ``device`` field of every config that runs a model."""
    return option("auto", help="auto (CUDA if available), cpu, cuda or cuda:N")


MAX_IMAGE_SIDE = 16384            # pixels per side: the most an --image_size, a calib.json's image_size or a read image may have
MAX_IMAGE_PIXELS = 40_000_000     # more pixels than this (8K UHD has 33 M): refused before anything is decoded or made


def image_size(text: str, minimum: int = 1) -> tuple[int, int]:
    """``--image_size``: ``"256x128"`` -> (256, 128) = (W, H); ArgumentTypeError unless both are integers
    >= ``minimum``, at most `MAX_IMAGE_SIDE` each and `MAX_IMAGE_PIXELS` together (an image that size would
    be allocated for every frame)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image_size must look like WxH, e.g. 256x128; got {text!r}") from None
    if w < minimum or h < minimum:
        raise argparse.ArgumentTypeError(f"--image_size must be at least {minimum}x{minimum}, got {text!r}")
    if max(w, h) > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
        raise argparse.ArgumentTypeError(f"--image_size {text}: at most {MAX_IMAGE_SIDE} pixels per side and "
                                         f"{MAX_IMAGE_PIXELS} in all")
    return w, h


def command_line(module: str, cfg: Any) -> str:
    """The ``python -m <module> ...`` command that makes ``cfg`` (fields that differ from their defaults;
    positional fields written without a flag), for logs: a reader can re-run a stage by hand."""
    words = [f"python -m {module}"]
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_positional(f):
            words.append(shlex.quote(str(value)))
        elif value != flag_default(f):
            if isinstance(value, bool):
                words.append(f"--{f.name}")
            elif isinstance(value, list) and is_repeated(f):
                words += [f"--{f.name} {shlex.quote(str(v))}" for v in value]
            elif isinstance(value, list):                        # nargs="+": --train_segments a b
                words.append(" ".join([f"--{f.name}", *(shlex.quote(str(v)) for v in value)]))
            else:
                words.append(f"--{f.name} {shlex.quote(str(value))}")
    return " ".join(words)
