"""attendance-hub: a real-time time-and-attendance hub."""

__version__ = "0.1.0"
