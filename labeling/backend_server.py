"""One small HTTP server for Label Studio to call: the ML-backend protocol and webhooks.

    GET  /health    {"status": "UP"} (+ "model_version" for an authorised caller)
    GET  /metrics   Prometheus text: the loop's counts from the stores (labeling.loop_metrics)
                    and /predict latency; no secret, as scrapers expect (it names no data)
    POST /setup     Label Studio connects a project -> {"model_version": ...}
    POST /predict   {"tasks": [...]} -> {"results": [{result, score, model_version}, ...]}
    POST /webhook   annotation events (project webhooks and ML-backend events alike) and
                    START_TRAINING ("Start Training" in Label Studio: retrain at once)
    POST /train     the same START_TRAINING, as Label Studio sends it with its webhook
                    feature flag off

Every call but /health needs the shared secret: as HTTP basic auth (any user name; Label
Studio's ML-backend "basic auth" setting) or in the X-Visionloop-Secret header (Label
Studio's custom webhook headers). Without it: 401, counted in the events file, nothing
run. Bound to loopback by default; Label Studio must be told it may call local URLs
(labeling.server does that).
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from visionloop.core.errors import InputError
from visionloop.labeling.backend_auth import SECRET_HEADER, authorised
from visionloop.labeling.events import ANNOTATION_EVENTS, START_TRAINING, RetrainTrigger
from visionloop.labeling.loop_metrics import CONTENT_TYPE, LoopMetrics, LoopStores
from visionloop.labeling.predictor import Predictor

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024  # a /predict with many base64 images stays well below


class BackendServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], predictor: Predictor | None,
                 trigger: RetrainTrigger, secret: str, stores: LoopStores | None = None) -> None:
        if len(secret) < 16:
            raise InputError("the backend's shared secret must have at least 16 characters")
        super().__init__(address, _Handler)
        self.predictor, self.trigger, self.secret = predictor, trigger, secret
        self.metrics = LoopMetrics(stores)
        self.predict_lock = threading.Lock()  # one model, one batch at a time

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: BackendServer

    def log_message(self, fmt: str, *args: object) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def _reply(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._reply(413, {"error": f"body over {MAX_BODY_BYTES} bytes"})
            return None
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as exc:
            self._reply(400, {"error": f"body is not JSON: {exc}"})
            return None
        if not isinstance(body, dict):
            self._reply(400, {"error": "body must be a JSON object"})
            return None
        return body

    def _model_version(self) -> str | None:
        return self.server.predictor.model_version if self.server.predictor else None

    def _authorised(self, route: str) -> bool:
        if authorised(self.headers, self.server.secret):
            return True
        self.server.trigger.refuse(route)
        log.warning("refused %s from %s: missing or wrong secret", route, self.address_string())
        self._reply(401, {"error": f"send the shared secret (basic auth or {SECRET_HEADER})"},
                    {"WWW-Authenticate": 'Basic realm="visionloop"'})
        return False

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") == "/metrics":
            data = self.server.metrics.exposition()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if self.path.rstrip("/") != "/health":
            self._reply(404, {"error": f"no route {self.path}"})
            return
        health = {"status": "UP", "model_class": "visionloop"}
        if authorised(self.headers, self.server.secret):  # liveness probes need no secret
            health["model_version"] = self._model_version()
        self._reply(200, health)

    def do_POST(self) -> None:  # noqa: N802
        route = self.path.rstrip("/")
        if route not in ("/setup", "/predict", "/webhook", "/train"):
            self._reply(404, {"error": f"no route {self.path}"})
            return
        if not self._authorised(route):
            return
        body = self._body()
        if body is None:
            return
        if route in ("/webhook", "/train"):
            action = START_TRAINING if route == "/train" else str(body.get("action", ""))
            started = (action in (*ANNOTATION_EVENTS, START_TRAINING)
                       and self.server.trigger.record(action))
            self._reply(200, {"status": "ok", "retrain_started": started})
            return
        predictor = self.server.predictor
        if predictor is None:
            self._reply(503, {"error": "no model loaded"})
            return
        with self.server.predict_lock:
            if route == "/setup":
                predictor.reload()
                self._reply(200, {"model_version": predictor.model_version})
                return
            tasks = body.get("tasks")
            if not isinstance(tasks, list):
                self._reply(400, {"error": "'tasks' must be a list"})
                return
            with self.server.metrics.predict_seconds.time():
                results = predictor.predict(tasks)
            self._reply(200, {"results": results})


def serve_in_thread(server: BackendServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="labeling-backend", daemon=True)
    thread.start()
    return thread
