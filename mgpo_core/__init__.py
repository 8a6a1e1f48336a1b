"""MGPO core library: the method as plain functions and small classes (never imports Prefect).

The method: ``config/`` (the typed config tree), ``imaging``, ``grounding``, ``episodes``, ``reward``,
``algorithms``, ``logprobs``, ``packing``, ``rollout/``, ``modeling/``, ``data/``, ``training/``,
``evaluation/``. Beside it, ``ops/``: MLflow tracking and the model registry, and the local servers. The shells
around the library (``tasks``, ``flows``, ``mgpo_cli``) import it; it imports none of them.
"""
