"""ximrun: batch jobs against a Ximilar-style image API, checkpointed in SQLite."""

__version__ = "0.1.0"
