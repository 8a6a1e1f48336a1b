"""The operations around the method: MLflow tracking and the model registry, and the local servers.

- ``tracking``: where the MLflow store is and a metrics sink that never loses a record (the trainer logs
  through it; it imports nothing else of ``mgpo_core``).
- ``eval_log``: evaluation results as MLflow metrics, artifacts and model-version tags.
- ``registry``: checkpoints as MLflow model versions with lineage tags; champion/challenger promotion.
- ``servers``: local Prefect and MLflow servers (start, stop, probe) under the state folder.

Nothing in the method (``imaging`` ... ``training``, ``evaluation``) imports ``eval_log``, ``registry`` or
``servers``: the pipeline's tasks and the command line call them.
"""
