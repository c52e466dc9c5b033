"""Version status, aliases and rollouts: the clinical gates, in the registry.

Status moves one way: registered -> validated -> approved, and any of them
-> retired. Only approved versions take clinical traffic (primary or canary)
unless ``require_approved`` is relaxed for a test environment; a shadow
candidate, whose answers are never returned, needs validated.

Aliases name versions per model (``production`` is what deployments follow
by default). A rollout puts one candidate version beside an alias's version:
``canary`` (a share of traffic, sticky per patient) or ``shadow`` (mirrored,
audited, never returned). ``promote`` moves the alias and ends the rollout;
``rollback`` ends a rollout, or moves the alias back to where it was.

These functions only change the database; the gateway follows within
``rollout_cache_seconds``. The control plane deploys a version's application
before any of them points traffic at it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from medserve.db.models import Model, ModelAlias, ModelEvent, ModelVersion, Rollout, utcnow
from medserve.errors import (
    ModelNotFoundError,
    RolloutError,
    StatusTransitionError,
    VersionNotApprovedError,
    VersionNotFoundError,
)
from medserve.registry.routing import CANARY, SHADOW, RouteState, VersionRef, version_app_name

STATUSES = ("registered", "validated", "approved", "retired")
ALLOWED_TRANSITIONS: dict[str, set[str]] = {
    "registered": {"validated", "retired"},
    "validated": {"approved", "retired"},
    "approved": {"retired"},
    "retired": set(),
}
DEFAULT_ALIAS = "production"


# --- lookups ---------------------------------------------------------------------


def get_model(session: Session, name: str) -> Model:
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None:
        raise ModelNotFoundError("no registered model has this name", model=name)
    return model


def get_version(session: Session, model_name: str, version: str) -> ModelVersion:
    model = get_model(session, model_name)
    row = session.scalar(select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == version))
    if row is None:
        raise VersionNotFoundError(model=model_name, version=version)
    return row


def get_alias(session: Session, model: Model, alias: str) -> ModelAlias | None:
    return session.scalar(select(ModelAlias).where(ModelAlias.model_id == model.id, ModelAlias.name == alias))


def get_rollout(session: Session, model: Model) -> Rollout | None:
    return session.scalar(select(Rollout).where(Rollout.model_id == model.id))


def record_event(
    session: Session, model: Model, action: str, actor: str, version: str | None = None, **details: object
) -> None:
    """Append to the model's history (who decided what, when)."""
    session.add(ModelEvent(model_id=model.id, version=version, action=action, actor=actor, details=dict(details)))


def history(session: Session, model_name: str) -> list[ModelEvent]:
    model = get_model(session, model_name)
    query = select(ModelEvent).where(ModelEvent.model_id == model.id).order_by(ModelEvent.created_at)
    return list(session.scalars(query))


# --- status ------------------------------------------------------------------------


def check_transition(current: str, new: str) -> None:
    if new not in ALLOWED_TRANSITIONS.get(current, set()):
        allowed = sorted(ALLOWED_TRANSITIONS.get(current, set()))
        raise StatusTransitionError(
            f"a {current} version cannot become {new}", current=current, requested=new, allowed=allowed
        )


def set_status(session: Session, model_name: str, version: str, new: str, by: str) -> ModelVersion:
    """Move a version's status; approval records who approved and when."""
    row = get_version(session, model_name, version)
    check_transition(row.status, new)
    if new == "retired":
        serving = _serving_roles(session, row)
        if serving:
            raise StatusTransitionError(
                "a version that is serving cannot be retired; promote or roll back first",
                model=model_name, version=version, serving=serving,
            )
    now = utcnow()
    row.status = new
    row.status_changed_by, row.status_changed_at = by, now
    if new == "approved":
        row.approved_by, row.approved_at = by, now
    record_event(session, row.model, new, by, version)
    session.flush()
    return row


def _serving_roles(session: Session, version: ModelVersion) -> list[str]:
    roles = [f"alias {a.name}" for a in session.scalars(select(ModelAlias).where(ModelAlias.model_version_id == version.id))]
    roles += [f"{r.mode} candidate" for r in session.scalars(select(Rollout).where(Rollout.candidate_version_id == version.id))]
    return roles


def require_clinical(version: ModelVersion, model_name: str, *, require_approved: bool) -> None:
    """An approved version may take clinical traffic; a retired one never."""
    if version.status == "retired" or (require_approved and version.status != "approved"):
        raise VersionNotApprovedError(model=model_name, version=version.version, status=version.status)


def require_shadow_fit(version: ModelVersion, model_name: str, *, require_approved: bool) -> None:
    if version.status == "retired" or (require_approved and version.status not in {"validated", "approved"}):
        raise VersionNotApprovedError(
            "a shadow candidate must be validated or approved", model=model_name, version=version.version,
            status=version.status,
        )


# --- aliases -----------------------------------------------------------------------


def ensure_alias(session: Session, model: Model, alias: str, version: ModelVersion, by: str) -> ModelAlias:
    """The alias, created pointing at ``version`` if it does not exist yet (first apply)."""
    row = get_alias(session, model, alias)
    if row is None:
        row = ModelAlias(model_id=model.id, name=alias, model_version_id=version.id, updated_by=by)
        session.add(row)
        session.flush()
    return row


def set_alias(session: Session, model_name: str, alias: str, version: str, by: str) -> ModelAlias:
    """Point an alias at a version (for aliases no deployment follows, e.g. staging)."""
    model = get_model(session, model_name)
    target = get_version(session, model_name, version)
    row = get_alias(session, model, alias)
    record_event(session, model, "alias", by, version, alias=alias)
    if row is None:
        return ensure_alias(session, model, alias, target, by)
    if row.model_version_id != target.id:
        row.previous_version_id, row.model_version_id, row.updated_by = row.model_version_id, target.id, by
    session.flush()
    return row


# --- rollouts --------------------------------------------------------------------------


def start_rollout(
    session: Session,
    model_name: str,
    mode: str,
    version: str,
    by: str,
    *,
    percent: float = 0.0,
    alias: str = DEFAULT_ALIAS,
    require_approved: bool = True,
) -> Rollout:
    """Start (or re-weight) a canary, or start a shadow, against the alias's version."""
    if mode not in {CANARY, SHADOW}:
        raise RolloutError("mode must be canary or shadow", mode=mode)
    if mode == CANARY and not 0 < percent < 100:
        raise RolloutError("a canary takes between 0 and 100 percent (exclusive)", percent=percent)
    model = get_model(session, model_name)
    candidate = get_version(session, model_name, version)
    current = get_alias(session, model, alias)
    if current is None:
        raise RolloutError("the model has no such alias; apply a deployment that follows it first",
                           model=model_name, alias=alias)
    if current.model_version_id == candidate.id:
        raise RolloutError("the candidate is already the alias's version", model=model_name, version=version)
    if mode == CANARY:
        require_clinical(candidate, model_name, require_approved=require_approved)
    else:
        require_shadow_fit(candidate, model_name, require_approved=require_approved)
    row = get_rollout(session, model)
    if row is not None and (row.candidate_version_id != candidate.id or row.mode != mode):
        raise RolloutError(
            "another rollout is in progress; promote or roll it back first",
            model=model_name, mode=row.mode, candidate=row.candidate.version,
        )
    if row is None:
        row = Rollout(model_id=model.id, mode=mode, candidate_version_id=candidate.id, percent=percent, started_by=by)
        session.add(row)
    else:
        # Same candidate, same mode: re-weight in place. The rollout keeps its
        # id, which salts the sticky split, so patients already on the canary stay.
        row.percent = percent
    record_event(session, model, mode, by, version, alias=alias, percent=percent)
    session.flush()
    return row


def promote(
    session: Session, model_name: str, version: str, by: str, *, alias: str = DEFAULT_ALIAS,
    require_approved: bool = True,
) -> ModelAlias:
    """Make ``version`` the alias's version and end any rollout; the old one is kept for rollback."""
    model = get_model(session, model_name)
    target = get_version(session, model_name, version)
    require_clinical(target, model_name, require_approved=require_approved)
    row = get_alias(session, model, alias)
    if row is None:
        raise RolloutError("the model has no such alias", model=model_name, alias=alias)
    rollout = get_rollout(session, model)
    if rollout is not None:
        session.delete(rollout)
    if row.model_version_id != target.id:
        record_event(session, model, "promote", by, version, alias=alias, previous=row.version.version)
        row.previous_version_id, row.model_version_id, row.updated_by = row.model_version_id, target.id, by
    session.flush()
    return row


@dataclass(frozen=True)
class RollbackResult:
    action: str  # rollout_ended | alias_reverted
    version: str  # the version that now answers


def rollback(session: Session, model_name: str, by: str, *, alias: str = DEFAULT_ALIAS) -> RollbackResult:
    """End the rollout if one runs (all traffic back to the alias's version);
    otherwise move the alias back to its previous version."""
    model = get_model(session, model_name)
    row = get_alias(session, model, alias)
    if row is None:
        raise RolloutError("the model has no such alias", model=model_name, alias=alias)
    rollout = get_rollout(session, model)
    if rollout is not None:
        record_event(session, model, "rollback", by, rollout.candidate.version, alias=alias, ended=rollout.mode)
        session.delete(rollout)
        session.flush()
        return RollbackResult("rollout_ended", row.version.version)
    if row.previous_version_id is None:
        raise RolloutError("nothing to roll back: no rollout and no previous version", model=model_name)
    previous = row.previous_version
    if previous is None or previous.status == "retired":
        raise RolloutError("the previous version is retired", model=model_name)
    record_event(session, model, "rollback", by, previous.version, alias=alias, reverted_from=row.version.version)
    row.model_version_id, row.previous_version_id, row.updated_by = previous.id, row.model_version_id, by
    session.flush()
    return RollbackResult("alias_reverted", previous.version)


# --- what to deploy and how to route ------------------------------------------------------


def active_versions(session: Session, model_name: str, alias: str) -> list[ModelVersion]:
    """Versions a deployment following ``alias`` must have running: the alias's
    version first, then the rollout candidate, then the previous version (kept
    warm so that a rollback after a promote is instant)."""
    model = get_model(session, model_name)
    row = get_alias(session, model, alias)
    if row is None:
        return []
    result = [row.version]
    rollout = get_rollout(session, model)
    if rollout is not None:
        result.append(rollout.candidate)
    if row.previous_version is not None and row.previous_version.status != "retired":
        result.append(row.previous_version)
    seen: set[str] = set()
    return [v for v in result if not (v.version in seen or seen.add(v.version))]


def _ref(version: ModelVersion, deployment: str) -> VersionRef:
    return VersionRef(
        version=version.version,
        artifact_sha256=version.artifact_sha256,
        status=version.status,
        app_name=version_app_name(deployment, version.version),
    )


def route_states(session: Session, follows: dict[str, tuple[str, str]]) -> dict[str, RouteState]:
    """Model name -> RouteState for every model whose deployment follows an alias.

    ``follows`` maps model name -> (deployment name, alias), from the gateway's catalog.
    """
    states: dict[str, RouteState] = {}
    if not follows:
        return states
    models = {m.name: m for m in session.scalars(select(Model).where(Model.name.in_(list(follows))))}
    for name, (deployment, alias) in follows.items():
        model = models.get(name)
        row = get_alias(session, model, alias) if model is not None else None
        if row is None:
            continue
        rollout = get_rollout(session, model)
        if rollout is None:
            states[name] = RouteState(primary=_ref(row.version, deployment))
        else:
            states[name] = RouteState(
                primary=_ref(row.version, deployment),
                mode=rollout.mode,
                candidate=_ref(rollout.candidate, deployment),
                percent=rollout.percent,
                rollout_id=str(rollout.id),
            )
    return states
