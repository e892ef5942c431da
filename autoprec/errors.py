"""One error family for everything autoprec refuses; the CLI prints the message on one line."""

from __future__ import annotations


class AutoprecError(Exception):
    """Base of every error autoprec raises on purpose. The message names the culprit and the fix."""

    exit_code = 2  # the CLI's exit status: the user's input or setup is at fault


class SpecError(AutoprecError):
    """A model.py that breaks the contract."""


class PolicyError(AutoprecError):
    """A policy file or Policy object that cannot be used."""


class UnsupportedFormat(AutoprecError):
    """A numeric format that a layer or device cannot run; the search records it as infeasible."""


class SpaceError(AutoprecError):
    """A search-space file that cannot be used."""


class StoreError(AutoprecError):
    """A study store that cannot be reached or holds something other than expected."""


class StoreFault(StoreError):
    """The study store failed while in use (a statement cancelled by the server, a connection lost for
    good): the store is at fault, not the user's input."""

    exit_code = 1
