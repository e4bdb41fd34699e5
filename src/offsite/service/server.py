"""`offsite serve`: the model owner's HTTP service (FastAPI), over one copy of the full model.

    GET  /bundles                      the bundles this customer may download
    GET  /bundles/{id}                 one bundle's files (name, bytes, SHA-256)
    GET  /bundles/{id}/files/{name}    a file, streamed; HTTP range requests resume a download
    POST /adapters?bundle={id}         upload an adapter file (multipart: weights, metadata) -> its id
    GET  /adapters                     this customer's adapters
    POST /v1/completions               greedy generation through the full model with one of its adapters
    POST /v1/score                     log-likelihood of continuations after a prompt, likewise

Every request but `/health` carries `Authorization: Bearer <token>`. A customer sees only its own adapters:
another customer's adapter id is answered exactly as an unknown one (404).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from offsite.arch import blocks_config
from offsite.config import ServeConfig
from offsite.constants import ADAPTER_METADATA, ADAPTER_WEIGHTS, MANIFEST
from offsite.data.tokens import choice_sequence
from offsite.errors import OffsiteError
from offsite.exchange.adapter import check_plug, load_adapter
from offsite.files import one_line
from offsite.loading import load_model, load_tokenizer, pad_id
from offsite.service.batcher import Batcher
from offsite.service.catalogue import Bundle, read_catalogue
from offsite.service.routing import MultiAdapterModel
from offsite.service.state import INCOMING, ServiceState
from offsite.service.uploads import UploadError, receive

log = logging.getLogger(__name__)


class ServiceError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


class Service:
    """The state, the bundles, the full model with every registered adapter, and the request batcher."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.state = ServiceState(config.state)
        full = load_model(config.model).eval()
        self.num_layers = blocks_config(full.config).num_hidden_layers
        self.catalogue = read_catalogue(config.bundles, full)  # fingerprints read before routing changes the blocks
        self.tokenizer = load_tokenizer(config.model)
        self.multi = MultiAdapterModel(full)
        for adapter_id, _ in self.state.all_adapters():
            self.multi.add(adapter_id, load_adapter(self.state.adapter_folder(adapter_id),
                                                    scratch=self.state.root / INCOMING))
        self.batcher = Batcher(self.multi, pad_id(self.tokenizer), config.max_batch, config.batch_wait_ms / 1000)
        log.info("serving %d bundles and %d adapters", len(self.catalogue), len(self.multi.adapters))

    def customer(self, request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        customer = self.state.customer_of(token.strip()) if scheme.lower() == "bearer" else None
        if customer is None:
            raise ServiceError(401, "missing or invalid token: send 'Authorization: Bearer <token>'",
                               "authentication_error")
        return customer

    def bundle(self, bundle_id: str) -> Bundle:
        if bundle_id not in self.catalogue:
            raise ServiceError(404, f"no bundle {bundle_id!r}", "not_found_error")
        return self.catalogue[bundle_id]

    def adapter(self, customer: str, adapter_id: str | None) -> str:
        if not adapter_id or self.state.adapter(adapter_id, customer) is None:
            raise ServiceError(404, f"no adapter {adapter_id!r} of yours", "not_found_error")
        return adapter_id

    def accept(self, customer: str, bundle: Bundle, folder: Path) -> str:
        """Check an uploaded adapter file as `plug` would for this bundle, then register and load it."""
        try:
            adapter = load_adapter(folder, scratch=folder)
            if adapter.fingerprint != bundle.manifest.fingerprint:
                raise OffsiteError(f"the adapter was made for another base model or bundle (fingerprint "
                                   f"{adapter.fingerprint[:16]}…, bundle {bundle.id}'s {bundle.manifest.fingerprint[:16]}…)")
            check_plug(adapter, "the upload", tuple(bundle.manifest.plan.adapter), self.num_layers,
                       lambda: bundle.manifest.fingerprint)
            self.multi.check("the upload", adapter)
        except OffsiteError as error:
            raise ServiceError(400, one_line(str(error).replace(str(folder), "the upload"), limit=None)) from error
        digest = hashlib.sha256()
        for name in (ADAPTER_WEIGHTS, ADAPTER_METADATA):
            digest.update(hashlib.sha256((folder / name).read_bytes()).digest())
        adapter_id = digest.hexdigest()[:32]
        for extra in [p for p in folder.iterdir() if p.name not in (ADAPTER_WEIGHTS, ADAPTER_METADATA)]:
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
        try:
            self.state.register_adapter(customer, bundle.id, folder, adapter_id, adapter.fingerprint, adapter.layers)
        except OffsiteError as error:
            raise ServiceError(409, str(error), "conflict_error") from error
        if adapter_id not in self.multi.adapters:
            self.multi.add(adapter_id, adapter)
        return adapter_id

    def close(self) -> None:
        self.batcher.close()
        self.state.close()


class CompletionRequest(BaseModel):
    adapter: str | None = Field(None, description="adapter id (OpenAI's `model` is taken as well)")
    model: str | None = None
    prompt: str
    max_tokens: int = Field(16, ge=1, le=512)
    stop: list[str] | str | None = None


class ScoreRequest(BaseModel):
    adapter: str | None = None
    model: str | None = None
    prompt: str = Field(..., min_length=1)
    continuations: list[str] = Field(..., min_length=1, max_length=64)


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="offsite", description="Offsite-Tuning: bundles out, adapters in, plugged models served")

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, error: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse({"error": {"message": str(error), "type": error.kind}}, error.status, headers=headers)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/bundles")
    async def bundles(request: Request) -> list[dict[str, Any]]:
        service.customer(request)
        return [b.listing() for b in service.catalogue.values()]

    @app.get("/bundles/{bundle_id}")
    async def bundle(bundle_id: str, request: Request) -> dict[str, Any]:
        service.customer(request)
        return service.bundle(bundle_id).listing()

    @app.get("/bundles/{bundle_id}/files/{name}")
    async def bundle_file(bundle_id: str, name: str, request: Request) -> FileResponse:
        customer = service.customer(request)
        found = service.bundle(bundle_id)
        if name != MANIFEST and name not in found.manifest.files:
            raise ServiceError(404, f"bundle {bundle_id} has no file {name!r}", "not_found_error")
        digest = found.manifest.files.get(name) or hashlib.sha256((found.folder / name).read_bytes()).hexdigest()
        if "range" not in request.headers:
            service.state.audit(customer, "bundle file downloaded", bundle_id, name)
        return FileResponse(found.folder / name, headers={"X-Content-SHA256": digest},
                            media_type="application/octet-stream")

    @app.post("/adapters", status_code=201)
    async def upload(request: Request, bundle: str) -> dict[str, Any]:
        customer = service.customer(request)
        target = service.bundle(bundle)
        folder = service.state.incoming()
        try:
            await receive(request.headers.get("content-type", ""), request.headers.get("content-length"),
                          request.stream(), folder, service.config.max_upload_bytes())
            adapter_id = await asyncio.to_thread(service.accept, customer, target, folder)
        except UploadError as error:
            service.state.audit(customer, "upload refused", bundle, str(error))
            raise ServiceError(error.status, str(error)) from error
        except ServiceError as error:
            service.state.audit(customer, "upload refused", bundle, str(error))
            raise
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # registered adapters were moved out of it
        return {"id": adapter_id, "bundle": bundle}

    @app.get("/adapters")
    async def adapters(request: Request) -> list[dict[str, Any]]:
        return service.state.adapters_of(service.customer(request))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> dict[str, Any]:
        customer = service.customer(request)
        adapter = service.adapter(customer, body.adapter or body.model)
        service.state.audit(customer, "completion", adapter)
        return await complete(service, adapter, body)

    @app.post("/v1/score")
    async def score(body: ScoreRequest, request: Request) -> dict[str, Any]:
        customer = service.customer(request)
        adapter = service.adapter(customer, body.adapter or body.model)
        service.state.audit(customer, "score", adapter)
        window = service.config.max_length
        futures = [service.batcher.score(*_scored(service.tokenizer, body.prompt, c, window), adapter)
                   for c in body.continuations]
        found = [await asyncio.wrap_future(f) for f in futures]
        return {"object": "score", "adapter": adapter,
                "scores": [{"continuation": c, "logprob": lp, "greedy": g} for c, (lp, g) in zip(body.continuations, found)]}

    return app


def _scored(tokenizer, prompt: str, continuation: str, window: int) -> tuple[list[int], list[int]]:
    sequence = choice_sequence(tokenizer, prompt, continuation, window)  # split and cut as `offsite eval` does
    return sequence.input_ids, sequence.labels


async def complete(service: Service, adapter: str, body: CompletionRequest) -> dict[str, Any]:
    """Greedy decoding, one batched forward pass per token (no KV cache: the router runs whole sequences)."""
    tokenizer = service.tokenizer
    prompt = tokenizer(body.prompt)["input_ids"][-service.config.max_length:]
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    ids, reason = list(prompt), "length"
    text = ""
    for _ in range(body.max_tokens):
        token, _ = await asyncio.wrap_future(service.batcher.next_token(ids[-service.config.max_length:], adapter))
        if token == tokenizer.eos_token_id:
            reason = "stop"
            break
        ids.append(token)
        text = tokenizer.decode(ids[len(prompt):], skip_special_tokens=True)
        if any(stop in text for stop in stops):
            text, reason = min((text.split(stop)[0] for stop in stops if stop in text), key=len), "stop"
            break
    return {"object": "text_completion", "model": adapter,
            "choices": [{"index": 0, "text": text, "finish_reason": reason}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(ids) - len(prompt),
                      "total_tokens": len(ids)}}
