"""The Label Studio project for a model: created from the manifest, found again by title.

The labeling config is a single-choice image classification over the manifest's classes.
Tasks carry the model's guess as a prediction, so annotators see it pre-selected.

The order annotators get tasks in is push's ranking. Label Studio's "Uncertainty
sampling" hands out the lowest prediction score first, but only among predictions whose
model_version equals the project's (projects/functions/next_task.py in 1.23); others fall
back to random order. So the project's model_version is one fixed queue name that no model
ever uses, push's prediction carries it with a score that is the task's queue position
(labeling.push.queue_score), and the ML backend's own predictions (its model's version)
never reorder the queue. A promotion changes nothing here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from xml.etree import ElementTree
from xml.sax.saxutils import quoteattr

from label_studio_sdk import LabelStudio

from visionloop.core.errors import InputError
from visionloop.labeling.backend_auth import BASIC_AUTH_USER, SECRET_HEADER
from visionloop.labeling.client import unavailable_as_error

log = logging.getLogger(__name__)

FROM_NAME, TO_NAME, IMAGE_KEY, REVIEW_NOTE_KEY = "label", "image", "image", "review_note"
QUEUE_MODEL_VERSION = "visionloop-queue"  # the model_version of push's predictions
SAMPLING = "Uncertainty sampling"


class ProjectError(InputError):
    """The Label Studio project does not fit the model (a user can fix it from the message)."""


def label_config(classes: tuple[str, ...]) -> str:
    choices = "".join(f"<Choice value={quoteattr(c)}/>" for c in classes)
    # the header is empty but on review tasks, where it shows the disagreement (labeling.pull)
    return (f'<View><Header value="${REVIEW_NOTE_KEY}"/>'
            f'<Image name="{TO_NAME}" value="${IMAGE_KEY}" zoom="true"/>'
            f'<Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" '
            f'showInline="true">{choices}</Choices></View>')


def config_classes(config: str) -> list[str]:
    """The choice values a labeling config offers (someone may have added some)."""
    try:
        root = ElementTree.fromstring(config)
    except ElementTree.ParseError as exc:
        raise ProjectError(f"the project's labeling config is not XML: {exc}") from exc
    return [choice.get("value", "") for choice in root.iter("Choice")]


@dataclass(frozen=True)
class Project:
    id: int
    title: str
    classes: tuple[str, ...]  # the model's classes, the order of its probabilities
    extra_classes: tuple[str, ...]  # offered in Label Studio but unknown to the model


def default_title(model_name: str) -> str:
    return f"visionloop {model_name}"


def ensure_project(client: LabelStudio, title: str, classes: tuple[str, ...]) -> Project:
    """Find the project by title or create it; idempotent across runs. Label Studio down or
    failing: LabelStudioUnavailable."""
    if len(title) < 3:
        raise ProjectError(f"Label Studio project titles need 3 characters or more: {title!r}")
    with unavailable_as_error("finding the project"):
        return _find_or_create(client, title, classes)


def _find_or_create(client: LabelStudio, title: str, classes: tuple[str, ...]) -> Project:
    matches = [p for p in client.projects.list(title=title) if p.title == title]
    if len(matches) > 1:
        raise ProjectError(f"{len(matches)} Label Studio projects are titled {title!r}; "
                           f"rename or delete all but one (ids {[p.id for p in matches]})")
    if matches:
        project = client.projects.get(id=matches[0].id)
        offered = config_classes(project.label_config or "")
        missing = [c for c in classes if c not in offered]
        if missing:
            raise ProjectError(f"project {title!r} (id {project.id}) does not offer the "
                               f"model's classes {missing}; fix its labeling config")
        extra = tuple(c for c in offered if c not in classes)
        if extra:
            log.warning("project %r offers classes the model does not know: %s (their labels "
                        "are reported by pull, not used for training)", title, list(extra))
        if project.model_version != QUEUE_MODEL_VERSION or project.sampling != SAMPLING:
            # connecting an ML backend first names the project's version after it; an older
            # project used the model's version, which changes with every promotion
            log.info("project %r: handing out tasks in push's order (model_version %r -> %r)",
                     title, project.model_version, QUEUE_MODEL_VERSION)
            client.projects.update(id=project.id, model_version=QUEUE_MODEL_VERSION,
                                   sampling=SAMPLING)
        return Project(project.id, title, classes, extra)
    project = client.projects.create(title=title, label_config=label_config(classes),
                                     sampling=SAMPLING, model_version=QUEUE_MODEL_VERSION,
                                     description="Images the model was unsure of, "
                                                 "in the order push ranked them.")
    log.info("created Label Studio project %r (id %d)", title, project.id)
    return Project(project.id, title, classes, ())


ANNOTATION_WEBHOOK_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED")


def connect_backend(client: LabelStudio, project: Project, url: str, secret: str) -> None:
    """Point the project's ML backend and its annotation webhook at our backend server
    (labeling.backend_server), both sending the shared secret: basic auth for the ML
    backend, a custom header for the webhook. Idempotent: what already points there is
    updated, not duplicated."""
    url = url.rstrip("/")
    auth = dict(auth_method="BASIC_AUTH", basic_auth_user=BASIC_AUTH_USER,
                basic_auth_pass=secret)
    with unavailable_as_error("connecting the ML backend"):
        backends = [b for b in client.ml.list(project=project.id) if b.url.rstrip("/") == url]
        if backends:
            client.ml.update(id=backends[0].id, url=url, project=project.id, **auth)
        else:
            client.ml.create(project=project.id, url=url, title="visionloop", **auth)
        hook = dict(url=f"{url}/webhook", send_payload=True, send_for_all_actions=False,
                    actions=list(ANNOTATION_WEBHOOK_ACTIONS), headers={SECRET_HEADER: secret})
        hooks = [h for h in client.webhooks.list(project=str(project.id))
                 if h.url == hook["url"]]
        if hooks:
            client.webhooks.update(id=hooks[0].id, **hook)
        else:
            client.webhooks.create(project=project.id, **hook)
    log.info("project %d: ML backend and webhook at %s (with the shared secret)", project.id, url)
