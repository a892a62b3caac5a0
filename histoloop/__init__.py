"""Histoloop: active-learning labelling for histopathology.

The Django project package is named after the product, not ``platform``: a package
called ``platform`` would shadow Python's standard-library module of that name.
"""

from .celery import app as celery_app

__all__ = ["celery_app"]
