"""Recipes for Harbor task directories (``python -m recipes.harbor.check``)."""
