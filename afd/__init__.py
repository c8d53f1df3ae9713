"""afd-sim: a hardware-free, multi-process twin of the Ascend AFD operator pipeline."""
__version__ = "0.1.0"
