"""The ``mgpo`` command line: argument parsing and console output over ``mgpo_core``, ``tasks`` and ``flows``.

The outermost shell. ``main`` dispatches to one module per command group (``config``, ``demo``, ``models``,
``data``, ``train``, ``evaluate``, ``pipeline``, ``servers``); each imports the shared helpers from ``common``
and the library below it, never the other way round.
"""
