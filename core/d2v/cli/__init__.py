"""The ``d2v`` and ``d2v-run`` command lines (``main``) and the commands kept apart so building the
parser stays import-light (``export``, ``reports``).

The top of the import graph: nothing in d2v imports it.
"""
