"""The one exception hierarchy of medserve.

Every error a caller can see is a ``MedserveError`` subclass with a stable
``code`` (part of the public API: clients branch on it) and an HTTP status.
The mapping to HTTP lives in exactly one place, :mod:`medserve.gateway.errors`.

Messages must never contain request content: exception text ends up in logs
and responses, and request content can be patient data. Put identifiers that
are safe (a model name, a field name) in keyword fields instead.
"""

from __future__ import annotations

from typing import Any, ClassVar


class MedserveError(Exception):
    """Root of every error medserve raises on purpose."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    default_message: ClassVar[str] = "The server could not complete the request."

    def __init__(self, message: str | None = None, **details: Any) -> None:
        self.message = message or self.default_message
        # Safe, structured context (never patient data): model names, field
        # names, limits. Returned to the caller under "error.details".
        self.details = details
        super().__init__(self.message)

    def to_payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return {"error": body}

    def __reduce__(self):  # keep the fields when Ray pickles it across processes
        return (_rebuild, (type(self), self.message, self.details))


def _rebuild(cls: type[MedserveError], message: str, details: dict[str, Any]) -> MedserveError:
    return cls(message, **details)


# --- configuration and specs -------------------------------------------------


class ConfigurationError(MedserveError):
    code = "configuration_error"
    default_message = "The configuration is invalid."


class OIDCDiscoveryError(ConfigurationError):
    """The identity provider's discovery document is unreachable, malformed or names another issuer."""

    code = "oidc_discovery_failed"
    http_status = 503
    default_message = "The identity provider's configuration could not be read."


class GatewayListenerError(ConfigurationError):
    """The gateway's own port cannot be served: the port is held by another program, or its TLS files
    cannot be read. Raised in the gateway replica's constructor, so Ray Serve reports the deployment
    as failed with this message instead of a replica that starts and then serves nothing."""

    code = "gateway_listener_unavailable"
    default_message = "The gateway's own port could not be opened."


class SpecError(ConfigurationError):
    """A deployment spec file failed to parse or validate."""

    code = "invalid_spec"
    default_message = "The deployment spec is invalid."


class ArtifactError(MedserveError):
    code = "artifact_unavailable"
    http_status = 503
    default_message = "The model artifact could not be loaded."


class ArtifactIntegrityError(ArtifactError):
    """The artifact's sha256 differs from the pinned one: refuse to serve it."""

    code = "artifact_integrity_failed"
    default_message = "The model artifact does not match its pinned sha256."


class VersionConflictError(ConfigurationError):
    """A version was registered before with a different artifact: versions are immutable."""

    code = "version_conflict"
    http_status = 409
    default_message = "This model version is already registered with a different artifact."


class VersionNotFoundError(MedserveError):
    code = "version_not_found"
    http_status = 404
    default_message = "No registered version of this model has this name."


class StatusTransitionError(MedserveError):
    """A version's status may move only registered -> validated -> approved -> retired."""

    code = "invalid_status_transition"
    http_status = 409
    default_message = "This status change is not allowed."


class VersionNotApprovedError(MedserveError):
    """Only approved versions take clinical traffic (MEDSERVE_REQUIRE_APPROVED_VERSIONS)."""

    code = "version_not_approved"
    http_status = 409
    default_message = "This model version is not approved for clinical traffic."


class RolloutError(MedserveError):
    """A rollout, promote or rollback that cannot be done in the model's current state."""

    code = "rollout_conflict"
    http_status = 409
    default_message = "The rollout cannot be changed this way now."


class MissingExtraError(ConfigurationError):
    """An engine needs an optional install extra that is not present."""

    code = "engine_not_installed"
    http_status = 503
    default_message = "The engine for this model is not installed."


# --- authentication and authorisation ---------------------------------------


class AuthenticationError(MedserveError):
    code = "unauthenticated"
    http_status = 401
    default_message = "A valid API key is required (Authorization: Bearer <key>)."


class PermissionDeniedError(MedserveError):
    code = "permission_denied"
    http_status = 403
    default_message = "This credential may not perform this operation."


class CsrfTokenError(PermissionDeniedError):
    """A review console form post without the CSRF token of its sign-in session (or with another one)."""

    code = "csrf_token_invalid"
    default_message = "This form is missing its session's CSRF token; reload the page and submit it again."


class ConsoleSignInRefusedError(PermissionDeniedError):
    """A credential whose role has no business in the review console (a clinical app, admin or ops key)."""

    code = "console_sign_in_refused"
    default_message = "Only clinician and auditor credentials can sign in to the review console."


class OIDCStateMismatchError(AuthenticationError):
    """The browser came back from the identity provider with a state this sign-in attempt did not send."""

    code = "oidc_state_mismatch"
    default_message = "This sign-in attempt is not recognised; start the sign-in again."


class OIDCLoginExpiredError(AuthenticationError):
    """The browser took longer than allowed between leaving for the identity provider and coming back."""

    code = "oidc_login_expired"
    default_message = "The sign-in took too long; start the sign-in again."


class OIDCTokenExchangeError(AuthenticationError):
    """The identity provider refused the authorization code (``idp_error`` carries its OAuth error code only)."""

    code = "oidc_token_exchange_failed"
    default_message = "The identity provider did not accept the sign-in."


class OIDCIdTokenInvalidError(AuthenticationError):
    """The ID token from the identity provider failed verification (signature, issuer, audience, time, nonce)."""

    code = "oidc_id_token_invalid"
    default_message = "The identity provider's answer could not be verified."


class RateLimitedError(MedserveError):
    """Over the request rate of the caller's key or department; ``retry_after_s`` says when to come back."""

    code = "rate_limited"
    http_status = 429
    default_message = "Too many requests; retry after the time in Retry-After."


class TokenBudgetExceededError(RateLimitedError):
    """The caller's key or department used its LLM tokens for the day (UTC)."""

    code = "token_budget_exceeded"
    default_message = "The daily token budget is used up; retry after the time in Retry-After."


# --- requests ---------------------------------------------------------------


class BadRequestError(MedserveError):
    code = "bad_request"
    http_status = 400
    default_message = "The request is invalid."


class InvalidReturnToError(BadRequestError):
    """A sign-in asked to return somewhere other than a page of the console (an open redirect)."""

    code = "invalid_return_to"
    default_message = "After sign-in the browser can only return to a page of the console."


class RequestValidationFailed(BadRequestError):
    code = "invalid_request"
    default_message = "The request body does not match the expected schema."


class UnsupportedMediaTypeError(MedserveError):
    code = "unsupported_media_type"
    http_status = 415
    default_message = "The request's content type is not accepted here."


class InvalidImageError(BadRequestError):
    code = "invalid_image"
    default_message = "The image could not be decoded."


class InvalidDicomError(InvalidImageError):
    code = "invalid_dicom"
    default_message = "The body is not a readable DICOM instance with pixel data."


class InputConstraintError(BadRequestError):
    """The input is well formed but outside what the model was validated for."""

    code = "input_not_supported"
    http_status = 422
    default_message = "This input is outside the model's validated use."


class InvalidMultipartError(BadRequestError):
    """A multipart/related body (a DICOM series upload) is malformed."""

    code = "invalid_multipart"
    default_message = "The multipart body is malformed."


class InvalidSeriesError(BadRequestError):
    """The DICOM instances do not form one consistent series (mixed series, shapes, orientations)."""

    code = "invalid_series"
    default_message = "The DICOM instances do not form one consistent series."


class InvalidRoiError(BadRequestError):
    code = "invalid_roi"
    default_message = "A region of interest is invalid for this series."


class ContextLengthExceededError(BadRequestError):
    code = "context_length_exceeded"
    default_message = "The prompt is longer than this model accepts."


class PayloadTooLargeError(MedserveError):
    code = "payload_too_large"
    http_status = 413
    default_message = "The request body is larger than allowed."


class ModelNotFoundError(MedserveError):
    code = "model_not_found"
    http_status = 404
    default_message = "No deployed model has this name."


class PipelineNotFoundError(ModelNotFoundError):
    code = "pipeline_not_found"
    default_message = "No pipeline has this name."


class AlreadyReviewedError(MedserveError):
    """A result is signed off once; the sign-off is part of the record."""

    code = "already_reviewed"
    http_status = 409
    default_message = "This result has already been reviewed."


class NotReviewableError(MedserveError):
    code = "not_reviewable"
    http_status = 409
    default_message = "This inference produced no reviewable result."


class OperationNotSupportedError(MedserveError):
    code = "operation_not_supported"
    http_status = 400
    default_message = "This model does not support this operation."


# --- serving ----------------------------------------------------------------


class ModelUnavailableError(MedserveError):
    code = "model_unavailable"
    http_status = 503
    default_message = "The model is not available right now; retry later."


class ModelOverloadedError(ModelUnavailableError):
    """The model's queue is full (Ray Serve's ``max_queued_requests``, or the gateway's
    own bounded wait for it): refused at once with Retry-After rather than left to time out."""

    code = "model_overloaded"
    default_message = "The model is at capacity; retry after the time in Retry-After."

    def __init__(self, message: str | None = None, **details: Any) -> None:
        details.setdefault("retry_after_s", 1)  # a queue drains in about a second: come back then
        super().__init__(message, **details)


class InferenceError(MedserveError):
    code = "inference_failed"
    http_status = 500
    default_message = "The model failed to produce a result."


class AuditUnavailableError(MedserveError):
    """The audit record could not be made durable, so the answer is withheld."""

    code = "audit_unavailable"
    http_status = 503
    default_message = "The audit trail is unavailable; the request was not answered."


class DatabaseUnavailableError(MedserveError):
    """The database did not answer and no last-known-good copy can stand in (a key never seen
    before, a route that reads or writes the registry itself): retrying after it returns helps."""

    code = "database_unavailable"
    http_status = 503
    default_message = "The database is unavailable; retry later."


class NotFoundError(MedserveError):
    code = "not_found"
    http_status = 404
    default_message = "Not found."


class MethodNotAllowedError(MedserveError):
    code = "method_not_allowed"
    http_status = 405
    default_message = "Not available."


class FrameworkHTTPError(MedserveError):
    """Another HTTP error the web framework raised itself; the response keeps the framework's status."""

    code = "http_error"
    http_status = 400
    default_message = "Not available."


class ClusterError(MedserveError):
    code = "cluster_error"
    http_status = 503
    default_message = "The Ray cluster could not be reached or refused the change."

    def __init__(self, message: str | None = None, *, retryable: bool = False, **details: Any) -> None:
        super().__init__(message, **details)
        # The cluster may accept the same idempotent request later (unreachable,
        # or a 5xx from the dashboard); a refusal of the request itself is not.
        self.retryable = retryable

    def __reduce__(self):  # keep retryable too when pickled
        return (_rebuild_cluster_error, (self.message, self.retryable, self.details))


def _rebuild_cluster_error(message: str, retryable: bool, details: dict[str, Any]) -> ClusterError:
    return ClusterError(message, retryable=retryable, **details)


def _all_subclasses(cls: type[MedserveError]) -> list[type[MedserveError]]:
    result = []
    for sub in cls.__subclasses__():
        result.append(sub)
        result.extend(_all_subclasses(sub))
    return result


def error_from_payload(payload: dict[str, Any]) -> MedserveError:
    """Rebuild an error that crossed a process boundary as ``to_payload()``."""
    body = payload.get("error", {})
    code = body.get("code", MedserveError.code)
    by_code = {cls.code: cls for cls in [MedserveError, *_all_subclasses(MedserveError)]}
    cls = by_code.get(code, MedserveError)
    return cls(body.get("message"), **body.get("details", {}))


class ModelTimeoutError(MedserveError):
    code = "model_timeout"
    http_status = 504
    default_message = "The model did not answer in time."
