"""The --help layout and the usage errors of every mla-jax command and bench suite."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """Every option's default in --help, once; epilogs keep their line breaks.

  An option whose help already says "(default" is shown as written; one with a `default_help`
  attribute (e.g. a bench option whose default depends on --quick) gets "(default: TEXT)"; a
  required option gets no default; every other one gets argparse's "(default: VALUE)"."""

  def _get_help_string(self, action):
    text = action.help or ""
    if "(default" in text:  # the help already says it in words
      return text
    if getattr(action, "default_help", None) is not None:
      return f"{text} (default: {action.default_help})"
    if action.required:
      return text
    return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
  """argparse's parser with a usage error on one line (the command, the problem, where to read
  the options) instead of the usage block above it; exit status 2 as argparse's."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
