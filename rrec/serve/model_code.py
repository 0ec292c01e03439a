"""The file MLflow runs to build the served model ("models from code"): logging a file
instead of a pickled object keeps the logged model free of pickled code."""

import mlflow

from rrec.serve.pyfunc import RecommenderModel

mlflow.models.set_model(RecommenderModel())
