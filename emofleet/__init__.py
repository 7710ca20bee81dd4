"""emofleet: speech-emotion analytics at scale."""

__version__ = "0.1.0"
