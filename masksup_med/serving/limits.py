"""What the REST endpoint accepts, and the error a refused request gets.

The limits themselves are the project's input limits (:mod:`masksup_med.data.limits`: pixels and decoded
bytes per image, read from its header before decoding; body bytes and images per request), shared with
``predict`` and the bundles' inference and evaluate configs, re-exported here with the serving errors.
"""

from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from masksup_med.data.limits import ImageHeader, ImageRejected, InputLimits, image_header, sniff_suffix

__all__ = [
    "ImageHeader",
    "ImageRejected",
    "InputLimits",
    "RequestRejected",
    "image_header",
    "sniff_suffix",
]


class RequestRejected(MlflowException, ValueError):
    """A request the endpoint refuses: HTTP ``status`` and a message for the client, never a stack trace.

    An ``MlflowException`` so that MLflow's scoring server answers it as JSON; ``masksup_status`` and
    ``masksup_message`` travel in that JSON, untouched, to :mod:`masksup_med.serving.app`. The message
    never quotes the request's data.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE, masksup_status=status, masksup_message=message)
        self.status = status
        self.reason = message

    @classmethod
    def from_image(cls, error: ImageRejected) -> RequestRejected:
        """The refusal of a request for an image refused from its header."""
        return cls(error.naming_option("serve"), error.status)

    @classmethod
    def too_many_images(cls, count: int, limit: int) -> RequestRejected:
        """The refusal (413) of a request holding more than ``limit`` images."""
        return cls(
            f"the request holds {count:,} images; the limit is {limit:,} per request (serve --max-images). "
            "Send them in several requests.",
            413,
        )

    def for_image(self, index: int, count: int) -> RequestRejected:
        """The same refusal, saying which image of the request it was about."""
        return RequestRejected(
            f"image {index + 1} of {count}: {self.reason}" if count > 1 else self.reason, self.status
        )
