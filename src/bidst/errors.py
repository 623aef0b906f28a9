"""User-facing errors: anything raised as BidstError is printed as one line by the CLI."""


class BidstError(Exception):
    """A problem with the user's input (config, data, checkpoint) that has a one-line explanation."""


class SharedError(BidstError):
    """An error that every DDP rank hits together (or hears of from rank 0); only rank 0 prints it."""


class DataError(BidstError):
    """A data file that cannot be read once training runs (an image that does not decode): the run checkpoints first."""
