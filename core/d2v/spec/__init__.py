"""Specs: reading and validating the YAML (``config``), checking that its parts fit and its data
exists (``fit``), and turning its ``model:`` section into modules (``model``).

Imports only ``d2v.api`` (components, objectives included, come from the registry).
"""
