"""User-facing errors: anything raised as BidstError is printed as one line by the CLI."""

from __future__ import annotations


class BidstError(Exception):
    """A problem with the user's input (config, data, checkpoint) that has a one-line explanation."""


class SharedError(BidstError):
    """An error that every DDP rank hits together (or hears of from rank 0); only rank 0 prints it."""

    @classmethod
    def of(cls, exc: BidstError) -> SharedError:
        """`exc` as a SharedError: for errors of input every rank reads alike (the command line, shared files)."""
        return exc if isinstance(exc, SharedError) else cls(str(exc))


class DataError(BidstError):
    """A data file that cannot be read once training runs (an image that does not decode): the run checkpoints first."""
