"""emofleet: speech-emotion analytics at scale. The version lives in pyproject.toml only."""
