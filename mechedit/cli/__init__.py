"""The ``mechedit`` command line: thin commands over the library's functions.

    mechedit [--device D] [--quiet] [--json] COMMAND ...
    mechedit locate METHOD --model M --data D --out circuits/X.json   # mechedit.cli.locate
    mechedit edit --model M --circuit X.json --method zero --out edits/N  # mechedit.cli.edit
    mechedit apply|revert|export EDIT --model M ...                    # mechedit.cli.edit
    mechedit eval --model M [--edit edits/N] --suite facts --data D    # mechedit.cli.evaluate
    mechedit run RECIPE.yaml                                          # mechedit.cli.recipe
    mechedit sweep RECIPE.yaml --over facts|seeds|k=8,16 [--ray ADDR] # mechedit.cli.sweep
    mechedit demo                                                     # mechedit.cli.demo
    mechedit circuits [--check] [--only NAME ...]                     # mechedit.cli.circuits
    mechedit world show|export|train|card                             # mechedit.cli.world
    mechedit report RUN_DIR                                           # mechedit.cli.report

Exit codes: 0 success; 2 bad input (unknown method, missing or malformed file, a subject not in
the prompt, a mismatched model: one line on stderr, no traceback); 1 any other failure
(``--traceback`` shows it). Heavy imports (torch, TransformerLens) happen inside the commands, so
``mechedit --help`` answers at once. Results go to stdout (one JSON object with ``--json``),
progress to stderr.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import NoReturn

from mechedit import __version__
from mechedit.cli._common import Context, UsageError, check_device


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit code 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # the same options before or after the command; SUPPRESS keeps a subcommand from resetting
    # what was given before it
    d = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument("--device", help="where to put the model: cpu, cuda, cuda:N, mps", **d)
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress messages or bars", **d)
    parser.add_argument("--json", action="store_true", help="print one JSON summary on stdout", **d)
    parser.add_argument("--traceback", action="store_true", help="show the traceback of a failure", **d)


def build_parser() -> argparse.ArgumentParser:
    from mechedit.cli import circuits, demo, edit, evaluate, locate, recipe, report, sweep, world

    parser = _Parser(
        prog="mechedit",
        description="Locate where a transformer keeps a fact and edit it there.",
        epilog="Run `mechedit COMMAND --help` for a command's options and examples. "
        "Exit codes: 0 ok, 2 bad input, 1 failure.",
    )
    parser.add_argument("--version", action="version", version=f"mechedit {__version__}")
    _global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for module in (locate, edit, evaluate, recipe, sweep, demo, circuits, world, report):
        module.register(sub, [common])
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])
    return text or type(err).__name__


def _bad_input() -> tuple[type[BaseException], ...]:
    # ArtifactError, DataFormatError and ModelMismatchError are ValueErrors; ModelNotFoundError a
    # FileNotFoundError. Imported here, not at the top, so --help stays free of torch.
    return (UsageError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version and argparse errors
        return int(stop.code or 0) if isinstance(stop.code, int) else 2
    show_traceback = getattr(args, "traceback", False)
    try:
        ctx = Context(device=check_device(args.device), quiet=args.quiet, json=args.json)
        return args.run(args, ctx)
    except KeyboardInterrupt:
        sys.stderr.write("mechedit: interrupted\n")
        return 130
    except _bad_input() as err:
        if show_traceback:
            traceback.print_exc()
        sys.stderr.write(f"mechedit {args.command}: error: {_one_line(err)}\n")
        return 2
    except Exception as err:
        if show_traceback:
            traceback.print_exc()
        sys.stderr.write(
            f"mechedit {args.command}: failed: {type(err).__name__}: {_one_line(err)} (rerun with --traceback for details)\n"
        )
        return 1


__all__ = ["build_parser", "main"]
