"""nbcron service: API, dispatcher, worker, store and CLI."""

__version__ = "0.1.0"
