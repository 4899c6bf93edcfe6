"""The bundled recipes: runnable entry points, `python -m recipes.<name> key=value ...`."""
