"""The host's block devices and whether each is in use."""
