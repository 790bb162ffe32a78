"""Optional backends that need extra packages (``pip install gpntk[keops]``); never imported by ``gpntk``."""
