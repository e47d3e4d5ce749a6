"""MLflow: the tracking store, a run's record, its figures, the model registry and the pickle-free
registered-model format."""
