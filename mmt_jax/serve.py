"""The serve binary: a checkpoint behind a JSON endpoint and one page to try it in a browser.

    mmt-jax serve --checkpoint runs/demo/mmt4 [--port 8000] [--prompt color: ...] [--closed-set]

- `GET /`: the page (`serve_page.html`): pick an image, type a title (and a description), see each
  attribute with its probability, whether it is accepted at the checkpoint's 90%-precision
  threshold (`acceptance.py`) and, for MoEMoE, how much it drew on each source.
- `POST /api/attributes`: a multipart form with `image` (a file), `title` and `description` (text,
  optional) -> `{"attributes": [{"attribute", "prompt", "value", "score", "probability",
  "accepted", "source_weights"}], "match": cosine | null}`. `score` is the answer's log-probability
  (`probability` its exp); `accepted` is null where the checkpoint has no threshold for the prompt;
  `source_weights` null but for MoEMoE; `match` is the contrastive head's score of the image and
  the title, for a checkpoint with the head (else null).
- `GET /api/info`: the checkpoint, its prompts and whether it reads an image.

A bad request (no image for a model that reads images, a file that is not an image, an upload over
`--max-upload-mb`, an unknown field, a text longer than `--input-length`) is answered with a 4xx
status and `{"error": "..."}` naming the field; the server keeps serving. Each request is received
on its own thread; the model answers them one at a time.

The HTTP side is Flask's (a WSGI app from `create_app`, served by werkzeug's threaded server); a
production deployment can mount `create_app(predictor, prompts)` in any WSGI server instead.
"""
import importlib.resources
import math
import threading
from typing import Sequence

import flask
from werkzeug import exceptions, serving

from mmt_jax.data import prompts as prompts_lib
from mmt_jax.errors import InputError
from mmt_jax.predictor import Predictor, Query, image_bytes

FIELDS = ("image", "title", "description")
DEFAULT_MAX_UPLOAD_MB = 10.0


def attribute_prompts(trained: Sequence[str] | None, asked: Sequence[str] = ()) -> list[str]:
    """The prompts to answer: `asked`, or the attribute prompts among those a checkpoint was
    trained on (`ModelConfig.prompts`; not matching nor titles). An `InputError` when neither
    names any."""
    if asked:
        return list(dict.fromkeys(asked))
    trained = [p for p in trained or ()
               if p not in (prompts_lib.MATCH_PROMPT, prompts_lib.TITLE_PROMPT)]
    if not trained:
        raise InputError("the checkpoint does not record attribute prompts it was trained on: "
                         "name them with --prompt (e.g. --prompt color:)")
    return trained


def create_app(predictor: Predictor, prompts: Sequence[str], *,
               max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 2 ** 20),
               name: str = "") -> flask.Flask:
    """The Flask app answering `prompts` for each product posted (the module docstring's routes)."""
    app = flask.Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_upload_bytes
    page = importlib.resources.files("mmt_jax").joinpath("serve_page.html").read_text("utf-8")
    model_lock = threading.Lock()
    has_head = getattr(predictor.model.module, "contrastive", None) is not None

    @app.errorhandler(exceptions.HTTPException)
    def http_error(error: exceptions.HTTPException):
        message = error.description
        if isinstance(error, exceptions.RequestEntityTooLarge):
            message = (f"the upload is larger than this server's limit of "
                       f"{max_upload_bytes / 2 ** 20:g} MB (--max-upload-mb)")
        return flask.jsonify(error=message), error.code

    @app.get("/")
    def index():
        return flask.Response(page, mimetype="text/html")

    @app.get("/api/info")
    def info():
        return flask.jsonify(checkpoint=name, prompts=list(prompts),
                             reads_images=predictor.uses_images, contrastive_head=has_head)

    @app.post("/api/attributes")
    def attributes():
        request = flask.request
        unknown = sorted((set(request.form) | set(request.files)) - set(FIELDS))
        if unknown:
            return _bad(f"unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
        upload = request.files.get("image")
        image = upload.read() if upload is not None else b""
        if predictor.uses_images and not image:
            return _bad("field 'image': missing or empty: this checkpoint reads an image with "
                        "each product")
        title = request.form.get("title", "").strip()
        description = request.form.get("description", "").strip()
        if not (title or description or image):
            return _bad("give at least one of the fields image, title, description")
        record = upload.filename if upload is not None and upload.filename else "upload"
        try:  # stored as a catalog stores images: upright (EXIF), 8-bit, capped in size
            image = image_bytes(image, record) if image else b""
            queries = [Query(record, prompt, title, description, image) for prompt in prompts]
            with model_lock:
                answers = [prediction for _, prediction in predictor.predict_queries(queries)]
                match = (predictor.match(image=image, title=title)
                         if has_head and image and title else None)
        except InputError as e:
            return _bad(str(e))
        return flask.jsonify(attributes=[
            {"attribute": prompt.removesuffix(":"), "prompt": prompt, "value": answer.text,
             "score": answer.score, "probability": math.exp(answer.score),
             "accepted": answer.accepted, "source_weights": answer.source_weights}
            for prompt, answer in zip(prompts, answers)], match=match)

    return app


def _bad(message: str):
    return flask.jsonify(error=message), 400


def serve(app: flask.Flask, host: str, port: int) -> None:
    """Serves `app` until interrupted (Ctrl-C or SIGTERM), each request on its own thread."""
    server = serving.make_server(host, port, app, threaded=True)
    print(f"serving on http://{host}:{server.server_port}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
