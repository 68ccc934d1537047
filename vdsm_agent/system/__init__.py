"""Talking to the operating system: commands, mounts, processes."""
