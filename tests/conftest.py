"""The suite's guards come from the afd pytest plugin (afd/pytest_plugin.py), loaded by its pytest11 entry point."""
