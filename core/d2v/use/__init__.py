"""Using trained models: ``d2v.pipeline``, ``d2v predict``, run tables (``runs``) and plots.

Imports anything below it (``api``, ``spec``, ``data``, ``interop``); nothing imports it but the CLI.
"""
