"""The MLflow "models from code" entry of the HAMburger pyfunc.

MLflow runs this file when it loads a registered model (instead of unpickling an object): it
builds the pyfunc from this project's code, which must be importable (the project installed).
Logged by trainer/export.py (register_model) through trainer.serving.pyfunc_spec.
"""

import mlflow

from trainer.serving import HAMburgerPyfunc

mlflow.models.set_model(HAMburgerPyfunc())
