"""User-facing errors: anything raised as BidstError is printed as one line by the CLI."""


class BidstError(Exception):
    """A problem with the user's input (config, data, checkpoint) that has a one-line explanation."""
