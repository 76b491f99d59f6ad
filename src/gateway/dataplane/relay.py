"""What passes between a client and an upstream while a call is in flight, when the gateway speaks for the server.

`/servers/{name}/mcp` relays bytes and needs none of this. The facade (a
server of the other era, a stdio server) and the `/mcp` aggregate make the
upstream call themselves, so whatever the upstream sends before its answer
must be carried across by the gateway:

- Progress: the client's `progressToken` is replaced by one of the gateway's
  (`gwp-<n>`, unique in the process) before the call goes upstream, where a
  session is shared by every client of this process; progress notifications
  come back with the client's own token. Log messages (`notifications/message`)
  are passed on. Other notifications on a call's stream are dropped.
- Server-to-client requests (sampling, elicitation, roots):
  - a 2025-era client gets the request on the call's SSE answer, under an id
    of the gateway's (`gwq-<random>`); its answer, POSTed to the same
    endpoint, is matched by that id and key and sent upstream under the
    upstream's own id. A client that did not accept `text/event-stream`
    cannot be asked: the upstream gets an error instead.
  - a 2026-07-28 client gets an `input_required` result for `tools/call`,
    `prompts/get` or `resources/read`: the request under `inputRequests`, and
    a `requestState` (`gwr1.<random>`) naming the paused upstream call. Its
    retry with `inputResponses` resumes that call where it stopped.
  - a 2026-07-28 upstream's own `input_required` result goes back unchanged
    to a 2026-07-28 client (its `requestState` is the upstream's, and the
    retry is forwarded as it is); for a 2025-era client the gateway asks the
    client each input request in turn and retries upstream itself.
  - `ping` is answered by the gateway.

A paused call, and a question put to a client, live in the gateway process
that holds the upstream stream: the retry (or the answer) must come to that
process, within `PAUSE_TTL` seconds (a paused call is then cancelled
upstream). Both are bound to the API key that made the call; another key's
retry or answer is refused as unknown.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.dataplane.jsonrpc import INVALID_PARAMS, METHOD_NOT_FOUND
from gateway.dataplane.mcp_client import UpstreamCall, UpstreamRpcError
from gateway.dataplane.upstream import UpstreamError, UpstreamTimeout

log = logging.getLogger("gateway.relay")

PROGRESS = "notifications/progress"
LOG_MESSAGE = "notifications/message"
# The client requests whose result may be `input_required` (2026-07-28).
INPUT_REQUIRED_METHODS = frozenset({"tools/call", "prompts/get", "resources/read"})
# The server-to-client requests a 2026-07-28 client takes as input requests.
INPUT_REQUESTS = frozenset({"sampling/createMessage", "elicitation/create", "roots/list"})
STATE_PREFIX = "gwr1."
ASK_PREFIX = "gwq-"
PAUSE_TTL = 300.0
# Rounds of an upstream's `input_required` the gateway drives for a 2025-era client (the SDKs use 10).
MAX_ROUNDS = 10
INTERNAL_ERROR = -32603
REQUEST_CANCELLED = -32800

Emit = Callable[[dict[str, Any]], Awaitable[bool]]


class Downstream:
    """The client's side of one call: who it is and how to reach it before the answer.

    `emit(message)` sends a message on the call's SSE answer and says whether
    it went out; None when the client did not accept `text/event-stream`.
    """

    __slots__ = ("modern", "key_id", "emit", "request_id")

    def __init__(
        self, *, modern: bool, key_id: uuid.UUID, emit: Emit | None, request_id: int | str | None = None
    ) -> None:
        self.modern = modern
        self.key_id = key_id
        self.emit = emit
        self.request_id = request_id  # the client's id for the call (its notifications/cancelled names it)


class _Running:
    """A call in progress, as the client's notifications/cancelled finds it."""

    __slots__ = ("call", "cancelled", "_starting")

    def __init__(self) -> None:
        self.call: UpstreamCall | None = None
        self.cancelled = False
        self._starting: asyncio.Future | None = None

    async def start(self, starting) -> UpstreamCall:
        """Await a call being sent (until its answer's headers), in a way `cancel` can interrupt."""
        if self.cancelled:
            starting.close()
            raise UpstreamError("cancelled by the client")
        self._starting = asyncio.ensure_future(starting)
        try:
            return await asyncio.shield(self._starting)
        except asyncio.CancelledError:
            if self._starting.cancelled() and self.cancelled:
                raise UpstreamError("cancelled by the client") from None
            self._starting.cancel()  # our own caller went away
            raise
        finally:
            self._starting = None

    def cancel(self) -> None:
        self.cancelled = True
        if self._starting is not None:
            self._starting.cancel()  # the exchange is dropped, which also tells the upstream
        elif self.call is not None:
            self.call.close("the client cancelled the request")  # its reader wakes with an error


class _Paused:
    __slots__ = ("key_id", "method", "call", "asked", "progress_token", "timer")

    def __init__(self, key_id, method, call, asked, progress_token, timer) -> None:
        self.key_id = key_id
        self.method = method
        self.call: UpstreamCall = call
        self.asked: dict[str, Any] = asked  # input request key -> the upstream's request id
        self.progress_token = progress_token
        self.timer: asyncio.TimerHandle = timer


class Relay:
    """Runs facade calls; owns the calls paused for input and the questions put to clients."""

    def __init__(self, *, timeout: float, max_duration: float = 3600.0, answer_timeout: float = PAUSE_TTL) -> None:
        self.timeout = timeout  # the longest an upstream may stay silent in a call (any message restarts it)
        self.max_duration = max_duration  # the longest a call may run, however chatty (time paused not counted)
        self.answer_timeout = answer_timeout  # the longest a client may take to answer a question
        self._paused: dict[str, _Paused] = {}
        self._asks: dict[str, tuple[uuid.UUID, asyncio.Future[dict[str, Any]]]] = {}
        self._tokens = itertools.count(1)
        # (key, the client's request id) -> that call, for the client's notifications/cancelled.
        self._running: dict[tuple[uuid.UUID, Any], _Running] = {}

    @property
    def paused(self) -> int:
        return len(self._paused)

    def close(self) -> None:
        for state in list(self._paused):
            self._expire(state, "the gateway is shutting down")
        for _, answer in self._asks.values():
            if not answer.done():
                answer.cancel()

    # -- answers from clients --------------------------------------------------------------------
    def accept_answer(self, key_id: uuid.UUID, message: dict[str, Any]) -> bool:
        """A client's response to a question the gateway relayed; True if a call was waiting for it."""
        request_id = message.get("id")
        if not isinstance(request_id, str) or not request_id.startswith(ASK_PREFIX):
            return False
        waiting = self._asks.get(request_id)
        if waiting is None or waiting[0] != key_id:
            return False  # unknown, answered already, or another key's: all look the same
        if not waiting[1].done():
            waiting[1].set_result(message)
        return True

    def cancel(self, key_id: uuid.UUID, request_id: Any) -> bool:
        """A 2025-era client's notifications/cancelled: stop its call (and so the upstream's). True if one ran."""
        if isinstance(request_id, (dict, list)):
            return False
        running = self._running.get((key_id, request_id))
        if running is None:
            return False
        running.cancel()
        return True

    # -- one call ----------------------------------------------------------------------------------
    async def call(self, client: Any, method: str, params: dict[str, Any], down: Downstream) -> dict[str, Any]:
        """Make `method` upstream for `down`'s client and return its result (or raise UpstreamRpcError)."""
        running = _Running()
        handle = (down.key_id, down.request_id)
        if down.request_id is not None and handle not in self._running:
            self._running[handle] = running
        else:
            handle = None
        try:
            return await self._call(client, method, params, down, running)
        except UpstreamError:
            if running.cancelled:
                # As a 2025-era server answers a cancelled request (a 2026-07-28 client has gone anyway).
                raise UpstreamRpcError({"code": REQUEST_CANCELLED, "message": "Request cancelled"}) from None
            raise
        finally:
            if handle is not None:
                self._running.pop(handle, None)

    async def _call(self, client: Any, method: str, params: dict[str, Any], down: Downstream, running: _Running):
        state = params.get("requestState")
        if isinstance(state, str) and state.startswith(STATE_PREFIX):
            upcall, progress_token = await self._resume(state, method, params, down)
        else:
            if not hasattr(client, "start"):
                return await client.request(method, params)  # upstreams that cannot stream a call yet
            upstream_params, progress_token = self._own_progress_token(params)
            upcall = await running.start(client.start(method, upstream_params))
        running.call = upcall
        rounds = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_duration
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise UpstreamTimeout(f"the call reached its maximum duration of {self.max_duration:g}s")
                try:
                    message = await upcall.next(min(self.timeout, left))
                except UpstreamTimeout:
                    if loop.time() >= deadline:
                        raise UpstreamTimeout(
                            f"the call reached its maximum duration of {self.max_duration:g}s"
                        ) from None
                    raise
                kind = message.get("method")
                if kind is None:
                    if message.get("id") != upcall.request_id:
                        continue  # an answer to something else: not this call's business
                    result = _result(message)
                    if result.get("resultType") != "input_required" or down.modern:
                        return result
                    # A 2026-07-28 upstream wants input and the client speaks the 2025 era: ask it.
                    rounds += 1
                    if rounds > MAX_ROUNDS:
                        raise UpstreamRpcError({"code": INTERNAL_ERROR,
                                                "message": f"the server asked for input more than {MAX_ROUNDS} times"})
                    responses = await self._ask_each(result.get("inputRequests") or {}, down)
                    retry = {k: v for k, v in params.items() if k not in ("inputResponses", "requestState")}
                    retry["inputResponses"] = responses
                    if "requestState" in result:
                        retry["requestState"] = result["requestState"]
                    upcall.close()
                    upcall = running.call = await running.start(client.start(method, self._own_progress_token(retry)[0]))
                elif "id" in message:
                    if kind == "ping":
                        await upcall.reply({"jsonrpc": "2.0", "id": message["id"], "result": {}})
                    elif down.modern:
                        if method in INPUT_REQUIRED_METHODS and kind in INPUT_REQUESTS:
                            paused = self._pause(upcall, method, message, down, progress_token)
                            upcall = None  # it lives on, paused
                            return paused
                        await upcall.reply(_error_reply(
                            message["id"], METHOD_NOT_FOUND,
                            f"{kind} cannot reach a 2026-07-28 client during {method}"))
                    else:
                        answer = await self._ask(down, kind, message.get("params"))
                        await upcall.reply({"jsonrpc": "2.0", "id": message["id"], **answer})
                elif kind == PROGRESS:
                    if progress_token is not None and down.emit is not None:
                        progress = dict(message.get("params") or {})
                        progress["progressToken"] = progress_token
                        await down.emit({"jsonrpc": "2.0", "method": PROGRESS, "params": progress})
                elif kind == LOG_MESSAGE and down.emit is not None:
                    await down.emit(message)
        finally:
            if upcall is not None:
                upcall.close()

    def _own_progress_token(self, params: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """The params with the gateway's progress token in place of the client's; and the client's."""
        meta = params.get("_meta")
        if not isinstance(meta, dict) or "progressToken" not in meta:
            return params, None
        ours = f"gwp-{next(self._tokens)}"
        return {**params, "_meta": {**meta, "progressToken": ours}}, meta["progressToken"]

    # -- 2026-07-28 clients: pause and resume ------------------------------------------------------
    def _pause(self, upcall: UpstreamCall, method: str, message: dict, down: Downstream, token: Any) -> dict:
        state = STATE_PREFIX + secrets.token_urlsafe(24)
        timer = asyncio.get_running_loop().call_later(PAUSE_TTL, self._expire, state, "nobody resumed it in time")
        self._paused[state] = _Paused(down.key_id, method, upcall, {"input-1": message["id"]}, token, timer)
        request = {"method": message["method"]}
        if "params" in message:
            request["params"] = message["params"]
        return {"resultType": "input_required", "inputRequests": {"input-1": request}, "requestState": state}

    async def _resume(self, state: str, method: str, params: dict, down: Downstream) -> tuple[UpstreamCall, Any]:
        paused = self._paused.get(state)
        if paused is None or paused.key_id != down.key_id or paused.method != method:
            raise UpstreamRpcError({
                "code": INVALID_PARAMS,
                "message": "Invalid params: requestState is unknown or has expired (a paused call is kept "
                f"{PAUSE_TTL:g} s by the gateway process that paused it); make the call again without it",
            })
        del self._paused[state]
        paused.timer.cancel()
        responses = params.get("inputResponses")
        responses = responses if isinstance(responses, dict) else {}
        try:
            for key, upstream_id in paused.asked.items():
                if isinstance(responses.get(key), dict):
                    reply = {"jsonrpc": "2.0", "id": upstream_id, "result": responses[key]}
                else:
                    reply = _error_reply(upstream_id, INVALID_PARAMS, "the client gave no answer to this request")
                await paused.call.reply(reply)
        except BaseException:
            paused.call.close()
            raise
        return paused.call, paused.progress_token

    def _expire(self, state: str, reason: str) -> None:
        paused = self._paused.pop(state, None)
        if paused is not None:
            paused.timer.cancel()
            log.debug("a call paused for input ended: %s", reason)
            paused.call.close(reason)

    # -- 2025-era clients: ask ---------------------------------------------------------------------
    async def _ask(self, down: Downstream, method: str, params: Any) -> dict[str, Any]:
        """Put one server-to-client request to the client; its `result` or `error`, for the upstream."""
        if down.emit is None:
            return {"error": {"code": METHOD_NOT_FOUND,
                              "message": f"{method}: the client cannot be asked (it takes no event stream)"}}
        ask_id = ASK_PREFIX + secrets.token_urlsafe(16)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._asks[ask_id] = (down.key_id, answer)
        question: dict[str, Any] = {"jsonrpc": "2.0", "id": ask_id, "method": method}
        if params is not None:
            question["params"] = params
        try:
            if not await down.emit(question):
                return {"error": {"code": INTERNAL_ERROR, "message": f"{method}: the client's stream is gone"}}
            async with asyncio.timeout(self.answer_timeout):
                reply = await answer
        except TimeoutError:
            return {"error": {"code": INTERNAL_ERROR,
                              "message": f"{method}: the client did not answer within {self.answer_timeout:g}s"}}
        finally:
            self._asks.pop(ask_id, None)
        if isinstance(reply.get("error"), dict):
            return {"error": reply["error"]}
        return {"result": reply.get("result") if isinstance(reply.get("result"), dict) else {}}

    async def _ask_each(self, requests: dict[str, Any], down: Downstream) -> dict[str, Any]:
        responses = {}
        for key, request in requests.items():
            if not isinstance(request, dict) or not isinstance(request.get("method"), str):
                raise UpstreamRpcError({"code": INTERNAL_ERROR, "message": "the server sent a malformed input request"})
            answer = await self._ask(down, request["method"], request.get("params"))
            if "error" in answer:
                raise UpstreamRpcError(answer["error"])
            responses[key] = answer["result"]
        return responses


def _error_reply(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def _result(message: dict[str, Any]) -> dict[str, Any]:
    if "error" in message:
        error = message["error"]
        raise UpstreamRpcError(error if isinstance(error, dict) else {"code": INTERNAL_ERROR, "message": str(error)})
    result = message.get("result")
    if not isinstance(result, dict):
        raise UpstreamError("the upstream's answer has no result object")
    return result
