"""The SageMaker inference contract over HTTP (FastAPI + uvicorn), on the ONNX runtime.

GET /ping           200 once the model is loaded
POST /invocations   {"text": "..."}     -> {"prediction": {"label": "<id>", "probability": p}}
                    {"texts": ["...", ...]} -> {"predictions": [...]}
"""

import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from gata_ft.runtime import InputError, Model

MAX_BATCH = 256


def create_app(model: Model):
    app = FastAPI(title="gata-ft router model", docs_url=None, redoc_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/ping")
    def ping() -> Response:
        return Response(status_code=200)

    @app.post("/invocations")
    async def invocations(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(
                400, f"expected a JSON object with a 'text' field, found invalid JSON: {e}"
            )
        if not isinstance(payload, dict):
            kind = type(payload).__name__
            return error(400, f"expected a JSON object with a 'text' field, found {kind}")
        top_k = payload.get("top_k", 0)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
            return error(400, f"top_k: expected a non-negative integer, found {top_k!r}")
        if "text" in payload:
            texts, single = [payload["text"]], True
        elif "texts" in payload:
            texts, single = payload["texts"], False
            if not isinstance(texts, list) or not 1 <= len(texts) <= MAX_BATCH:
                return error(400, f"'texts': expected a list of 1 to {MAX_BATCH} strings")
        else:
            keys = ", ".join(repr(k) for k in payload) or "none"
            return error(400, f"expected a 'text' field (or 'texts'), found fields: {keys}")
        try:
            # onnxruntime releases the GIL: run it in the thread pool, not the event loop.
            predictions = await run_in_threadpool(model.predict, texts, top_k)
        except InputError as e:
            message = str(e).replace("texts[0]", "text") if single else str(e)
            return error(400, message)
        if single:
            return JSONResponse({"prediction": predictions[0].to_dict()})
        return JSONResponse({"predictions": [p.to_dict() for p in predictions]})

    return app


def serve(model: Model, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(create_app(model), host=host, port=port, log_level="info", access_log=False)
