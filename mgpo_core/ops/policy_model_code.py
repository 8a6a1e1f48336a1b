"""The code file of the registered policy model (MLflow "models from code"): MLflow runs this file when it loads
the model, and the model is what ``set_model`` receives. Nothing is pickled; the class lives in
:mod:`mgpo_core.ops.policy_model`, shipped with the model as ``code_paths``. Not imported by the library.
"""

from mlflow.models import set_model

from mgpo_core.ops.policy_model import MGPOPolicyModel

set_model(MGPOPolicyModel())
