"""The one argument parser of every command (argparse, taught the house habits), and the value types its options
share.

Habits: a mistake is a :class:`UserError` (the CLI prints it as one line and exits 2) that says what was wrong and
ends with the command's usage; options are never abbreviated (``--out`` is not ``--output``); ``--some-key`` is
``--some_key``; an unknown option is an error that names the nearest known spelling."""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import NoReturn

from .errors import UserError


class ParserExit(Exception):
    """``--help`` was answered (or the parser otherwise finished the command): exit with ``status``."""

    def __init__(self, status: int = 0):
        super().__init__(status)
        self.status = status


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; option help wraps at spaces only (checkpoint-STEP stays whole)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """argparse's parser with the habits of the module docstring; every command builds its options on one."""

    def __init__(self, prog: str, usage: str | None = None, description: str | None = None,
                 epilog: str | None = None):
        super().__init__(prog=prog, usage=usage, description=description, epilog=epilog, allow_abbrev=False,
                         formatter_class=_HelpFormatter)

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:  # type: ignore[override]
        """Like argparse's, but every unknown option and stray argument is reported, each with a hint."""
        args = sys.argv[1:] if args is None else list(args)
        try:
            ns, extras = self.parse_known_args(args, namespace)
        except UserError:
            # argparse stops at its first problem; an unknown option usually explains it (a misspelt --output
            # leaves --output missing), so that is what to name.
            unknown = [a for a in self.normalize(args) if self.is_unknown_option(a)]
            if unknown:
                self.error(self.describe_extras(unknown))
            raise
        if extras:
            self.error(self.describe_extras(extras))
        return ns

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(self.normalize(sys.argv[1:] if args is None else list(args)), namespace)

    def normalize(self, args: list[str]) -> list[str]:
        """``--some-key[=v]`` spelled as the parser knows it, ``--some_key[=v]`` (before a bare ``--`` only)."""
        out = []
        for i, arg in enumerate(args):
            if arg == "--":
                return out + args[i:]
            if arg.startswith("--"):
                name, sep, value = arg.partition("=")
                alt = "--" + name[2:].replace("-", "_")
                if name not in self._option_string_actions and alt in self._option_string_actions:
                    arg = alt + sep + value
            out.append(arg)
        return out

    def is_unknown_option(self, arg: str) -> bool:
        """Whether argparse takes ``arg`` for an option it does not know."""
        return _looks_like_option(arg) and " " not in arg and arg.partition("=")[0] not in self._option_string_actions

    def describe_extras(self, extras: list[str]) -> str:
        """What is wrong with the arguments argparse could not place: unknown options (with the nearest known
        spelling) and arguments nothing expects."""
        problems = []
        for option, value in split_extras(extras):
            if option is None:
                problems.append(f"unexpected argument {value!r}")
            else:
                problems.append(f"unknown option {option}{self.nearest(option)}")
        return "; ".join(problems)

    def nearest(self, option: str) -> str:
        known = [s for s in self._option_string_actions if s.startswith("--")]
        close = difflib.get_close_matches("--" + option[2:].replace("-", "_"), known, n=1)
        return f" (did you mean {close[0]}?)" if close else ""

    def one_line_usage(self) -> str:
        return " ".join(self.format_usage().split())

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}; {self.one_line_usage()} ('{self.prog} --help' describes each option)")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            print(message, file=sys.stderr, end="")
        raise ParserExit(status)


def split_extras(extras: list[str]) -> list[tuple[str | None, str | None]]:
    """argparse's leftovers, in order, as (unknown option, its value or None) and (None, positional argument).
    An argument right after an unknown option is taken as that option's value, as ``--key value`` would be."""
    out: list[tuple[str | None, str | None]] = []
    i = 0
    while i < len(extras):
        arg = extras[i]
        if _looks_like_option(arg):
            name, sep, value = arg.partition("=")
            if sep:
                out.append((name, value))
            elif i + 1 < len(extras) and not _looks_like_option(extras[i + 1]):
                out.append((name, extras[i + 1]))
                i += 1
            else:
                out.append((name, None))
        else:
            out.append((None, arg))
        i += 1
    return out


def _looks_like_option(arg: str) -> bool:
    if not arg.startswith("-") or arg in ("-", "--"):
        return False
    try:
        float(arg)  # a negative number is a value
        return False
    except ValueError:
        return True


# --- value types: each failure reads "argument --key: <what is wrong>" -----------------------------------------


def _value(text: str, cast, noun: str, ok=None, rule: str = ""):
    """``text`` as ``cast`` reads it; text it cannot read fails with "'TEXT' is not NOUN", a value that fails ``ok``
    with "RULE, got 'TEXT'"."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
    if ok is not None and not ok(value):  # a NaN fails every bound
        raise argparse.ArgumentTypeError(f"{rule}, got {text!r}")
    return value


def integer(text: str) -> int:
    return _value(text, int, "an integer")


def positive_integer(text: str) -> int:
    """A count: one message for both mistakes (not a whole number, or below 1)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects a whole number of at least 1, got {text!r}")
    return value


def non_negative_integer(text: str) -> int:
    return _value(text, int, "an integer", lambda v: v >= 0, "must be 0 or more")


def number(text: str) -> float:
    return _value(text, float, "a number")


def positive_number(text: str) -> float:
    return _value(text, float, "a number", lambda v: v > 0, "must be above 0")


def non_negative_number(text: str) -> float:
    return _value(text, float, "a number", lambda v: v >= 0, "must be 0 or more")


def boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expects true or false, got {text!r}")
