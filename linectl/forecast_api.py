"""A running line's forecasts: ``POST /forecast`` on the operator API, the last one kept for the
metrics (``linectl_forecast_units``). One forecast at a time; each runs in a child process
(linectl/forecast.py)."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from linectl.endpoints import Body, HttpError, json_response, read_body
from linectl.forecast import (
    DEFAULT_REPLICATIONS,
    Forecast,
    ForecastError,
    ForecastFailed,
    forecast_async,
    snapshot,
)

_HHMM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


def parse_until(text: str, now: datetime | None = None) -> datetime:
    """``HH:MM`` (the next such time on this machine's clock, so 06:00 at night is tomorrow)
    or an ISO 8601 time (UTC if it has no zone). A ValueError names what is wrong."""
    now = now or datetime.now().astimezone()
    match = _HHMM.match(text.strip())
    if match:
        local = now.astimezone()
        at = local.replace(hour=int(match[1]), minute=int(match[2]), second=0, microsecond=0)
        return at if at > local else at + timedelta(days=1)
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"until '{text}' is not HH:MM or an ISO 8601 time") from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


class ForecastBusy(ForecastError):
    """Another forecast of this line is running."""


class ForecastBody(Body):
    until: str
    replications: int = DEFAULT_REPLICATIONS
    seed: int = 1


class Forecaster:
    """Forecasts for one running supervisor."""

    def __init__(self, sup: Any) -> None:
        self.sup = sup
        self.last: Forecast | None = None
        self._lock = asyncio.Lock()

    async def forecast(self, until: datetime, replications: int, seed: int = 1) -> Forecast:
        """Snapshot the line now and forecast it to ``until``; ForecastError if one is already
        running or the request is out of bounds."""
        if self._lock.locked():
            raise ForecastBusy("a forecast is already running; try again when it is done")
        async with self._lock:
            result = await forecast_async(snapshot(self.sup), until, replications, seed)
        self.last = result
        return result

    def add_routes(self, api: Any) -> None:
        """``serve_api(..., extend=forecaster.add_routes)``."""
        api.app.router.add_post("/forecast", self._post)

    async def _post(self, request: web.Request) -> web.Response:
        body = await read_body(request, ForecastBody)
        try:
            until = parse_until(body.until)
            result = await self.forecast(until, body.replications, body.seed)
        except ForecastBusy as exc:
            raise HttpError(409, str(exc)) from None
        except ForecastFailed as exc:
            raise HttpError(503, str(exc)) from None
        except (ValueError, ForecastError) as exc:
            raise HttpError(400, str(exc)) from None
        return json_response(result.to_dict())
