"""mailflow: collect the same piece of information from many delegations by email."""

__version__ = "0.1.0"
