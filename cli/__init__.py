"""The ``xmc`` command-line interface (a thin Click shell over :mod:`xmc_toolkit`)."""
