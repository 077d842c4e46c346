"""Workers behind the hub: punch persistence, and later fraud and overtime checks."""
