"""Backends: predictors (local models, python functions) and, later, batch services."""
