"""Distillation recipes: ``python -m recipes.distillation.<recipe> key=value ...``."""
