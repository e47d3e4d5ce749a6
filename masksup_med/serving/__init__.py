"""The REST model: an MLflow pyfunc segmenter, its server app and the limits on what it accepts."""
