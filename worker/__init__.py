"""Python drop-in for the Node BullMQ worker of the `ai-jobs` queue."""

__version__ = "0.1.0"
