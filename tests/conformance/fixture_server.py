"""The upstream the MCP conformance suite's server scenarios expect, on the official SDK.

`@modelcontextprotocol/conformance` (0.2.0-alpha.12) tests a server by calling tools,
resources and prompts with fixed names (`test_simple_text`, `test://static-text`,
`test_prompt_with_arguments`, ...) and checking what comes back. This module serves all
of them from one `MCPServer`, Streamable HTTP at /mcp, in both protocol eras the SDK
speaks on one endpoint: 2025-11-25 (initialize, sessions, server-to-client requests,
SSE resumability) and 2026-07-28 (stateless, `server/discover`, `subscriptions/listen`,
multi-round-trip `InputRequiredResult`s, caching hints).

It is test equipment: it exists so the suite can be run against it directly and through
the gateway (tests/conformance/run.py), and any scenario that passes directly but not
through the gateway is a gateway fault. It keeps no state that matters beyond one run.

Run alone: `python tests/conformance/fixture_server.py --port 8091` (path /mcp).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import warnings
from typing import Annotated, Any

from mcp.server.caching import CacheHint
from mcp.server.mcpserver import Context, MCPServer, UserMessage
from mcp.server.mcpserver.tools.base import Tool
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp.types import (
    AudioContent,
    CallToolResult,
    ClientCapabilities,
    Completion,
    CreateMessageRequest,
    CreateMessageRequestParams,
    ElicitRequest,
    ElicitRequestFormParams,
    ElicitResult,
    EmbeddedResource,
    EmptyResult,
    ImageContent,
    InputRequiredResult,
    JSONRPCMessage,
    ListRootsRequest,
    ListRootsResult,
    MissingRequiredClientCapabilityErrorData,
    SamplingCapability,
    SamplingMessage,
    SetLevelRequestParams,
    SubscribeRequestParams,
    TextContent,
    TextResourceContents,
    UnsubscribeRequestParams,
)
from pydantic import Field

# The 2025-era helpers this fixture must exercise (logging, sampling, elicitation,
# roots) are marked deprecated by the SDK for 2026-07-28; they are what is under test.
warnings.filterwarnings("ignore", category=MCPDeprecationWarning)

# 1x1 PNG and a minimal WAV, as the suite's reference fixture uses.
PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
WAV_BASE64 = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA="
MISSING_REQUIRED_CLIENT_CAPABILITY = -32021

# SEP-1613 / SEP-2106: a 2020-12 input schema whose keywords must survive tools/list.
JSON_SCHEMA_2020_12 = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {
        "address": {
            "$anchor": "addressDef",
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        }
    },
    "properties": {
        "name": {"type": "string"},
        "address": {"$ref": "#/$defs/address"},
        "contactMethod": {"type": "string", "enum": ["phone", "email"]},
        "phone": {"type": "string"},
        "email": {"type": "string"},
    },
    "allOf": [{"anyOf": [{"required": ["phone"]}, {"required": ["email"]}]}],
    "if": {"properties": {"contactMethod": {"const": "phone"}}, "required": ["contactMethod"]},
    "then": {"required": ["phone"]},
    "else": {"required": ["email"]},
    "additionalProperties": False,
}


class MemoryEventStore(EventStore):
    """Every SSE event kept in memory, so a client can resume with Last-Event-ID (SEP-1699)."""

    def __init__(self) -> None:
        self._events: list[tuple[str, str, JSONRPCMessage | None]] = []
        self._ids = itertools.count(1)

    async def store_event(self, stream_id: str, message: JSONRPCMessage | None) -> str:
        event_id = f"{stream_id}_{next(self._ids)}"
        self._events.append((stream_id, event_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: str, send_callback: EventCallback) -> str | None:
        position = next((i for i, (_, event_id, _) in enumerate(self._events) if event_id == last_event_id), None)
        if position is None:
            return None
        stream_id = self._events[position][0]
        for stream, event_id, message in self._events[position + 1 :]:
            if stream == stream_id and message is not None:  # None marks a priming event
                await send_callback(EventMessage(message, event_id))
        return stream_id


# -- multi-round-trip (SEP-2322) helpers -------------------------------------------------------
def _elicit(message: str, properties: dict[str, Any], required: list[str]) -> ElicitRequest:
    schema = {"type": "object", "properties": properties, "required": required}
    return ElicitRequest(params=ElicitRequestFormParams(message=message, requested_schema=schema))


def _sample(text: str, max_tokens: int) -> CreateMessageRequest:
    return CreateMessageRequest(
        params=CreateMessageRequestParams(
            messages=[SamplingMessage(role="user", content=TextContent(type="text", text=text))],
            max_tokens=max_tokens,
        )
    )


def _list_roots() -> ListRootsRequest:
    return ListRootsRequest()


def _accepted(ctx: Context, key: str) -> dict[str, Any] | None:
    """The content of an accepted elicitation answer under `key`, if the client sent one."""
    answer = (ctx.input_responses or {}).get(key)
    if isinstance(answer, ElicitResult) and answer.action == "accept":
        return dict(answer.content or {})
    return None


def _sampled_text(ctx: Context, key: str) -> str | None:
    answer = (ctx.input_responses or {}).get(key)
    content = getattr(answer, "content", None)
    return getattr(content, "text", None) if content is not None else None


def _roots(ctx: Context, key: str) -> list[str] | None:
    answer = (ctx.input_responses or {}).get(key)
    if isinstance(answer, ListRootsResult):
        return [str(root.uri) for root in answer.roots]
    return None


def _text(text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)])


def build_server() -> MCPServer:
    server = MCPServer(
        "mcp-gateway-conformance-fixture",
        version="1.0.0",
        instructions="Conformance fixture for the MCP gateway's tests.",
        tools=[_json_schema_tool()],
        # SEP-2549: every cacheable result says how long it stays fresh and for whom.
        cache_hints={
            method: CacheHint(ttl_ms=0, scope="private")
            for method in ("tools/list", "prompts/list", "resources/list", "resources/templates/list", "resources/read")
        },
    )
    _add_content_tools(server)
    _add_interactive_tools(server)
    _add_modern_tools(server)
    _add_resources(server)
    _add_prompts(server)
    _add_legacy_methods(server)
    return server


def _json_schema_tool() -> Tool:
    def json_schema_2020_12_tool(**arguments: Any) -> str:
        return json.dumps(arguments, sort_keys=True)

    tool = Tool.from_function(json_schema_2020_12_tool, description="Tool with JSON Schema 2020-12 features")
    return tool.model_copy(update={"parameters": JSON_SCHEMA_2020_12})


def _add_content_tools(server: MCPServer) -> None:
    @server.tool(description="Tests simple text content response")
    def test_simple_text() -> CallToolResult:
        return _text("This is a simple text response for testing.")

    @server.tool(description="Tests image content response")
    def test_image_content() -> CallToolResult:
        return CallToolResult(content=[ImageContent(type="image", data=PNG_BASE64, mime_type="image/png")])

    @server.tool(description="Tests audio content response")
    def test_audio_content() -> CallToolResult:
        return CallToolResult(content=[AudioContent(type="audio", data=WAV_BASE64, mime_type="audio/wav")])

    @server.tool(description="Tests embedded resource content response")
    def test_embedded_resource() -> CallToolResult:
        resource = TextResourceContents(
            uri="test://embedded-resource", mime_type="text/plain", text="This is an embedded resource content."
        )
        return CallToolResult(content=[EmbeddedResource(type="resource", resource=resource)])

    @server.tool(description="Tests response with multiple content types (text, image, resource)")
    def test_multiple_content_types() -> CallToolResult:
        resource = TextResourceContents(
            uri="test://mixed-content-resource",
            mime_type="application/json",
            text=json.dumps({"test": "data", "value": 123}),
        )
        return CallToolResult(
            content=[
                TextContent(type="text", text="Multiple content types test:"),
                ImageContent(type="image", data=PNG_BASE64, mime_type="image/png"),
                EmbeddedResource(type="resource", resource=resource),
            ]
        )

    @server.tool(description="Echoes a value that is mirrored into the Mcp-Param-Region header (SEP-2243)")
    def test_header_param(
        region: Annotated[str, Field(description="A region name", json_schema_extra={"x-mcp-header": "Region"})],
    ) -> str:
        return f"region={region}"

    @server.tool(description="Tests error response handling")
    def test_error_handling() -> str:
        raise RuntimeError("This tool intentionally returns an error for testing")


def _add_interactive_tools(server: MCPServer) -> None:
    """Tools that talk back to the client while they run (2025-era requests and notifications)."""

    @server.tool(description="Tests tool that emits log messages during execution")
    async def test_tool_with_logging(ctx: Context) -> str:
        await ctx.info("Tool execution started")
        await asyncio.sleep(0.05)
        await ctx.info("Tool processing data")
        await asyncio.sleep(0.05)
        await ctx.info("Tool execution completed")
        return "Tool with logging executed successfully"

    @server.tool(description="Tests tool that reports progress notifications")
    async def test_tool_with_progress(ctx: Context) -> str:
        for step in (0, 50, 100):
            await ctx.report_progress(step, 100, f"Completed step {step} of 100")
            if step < 100:
                await asyncio.sleep(0.05)
        meta = ctx.request_context.meta
        token = getattr(meta, "progress_token", None) if meta is not None else None
        return str(token if token is not None else 0)

    @server.tool(description="Tests server-initiated sampling (LLM completion request)")
    async def test_sampling(prompt: str, ctx: Context) -> str:
        result = await ctx.session.create_message(
            messages=[SamplingMessage(role="user", content=TextContent(type="text", text=prompt))],
            max_tokens=100,
            related_request_id=ctx.request_id,
        )
        text = result.content.text if result.content.type == "text" else "No response"
        return f"LLM response: {text}"

    @server.tool(description="Tests server-initiated elicitation (user input request)")
    async def test_elicitation(message: str, ctx: Context) -> str:
        schema = {
            "type": "object",
            "properties": {
                "username": {"type": "string", "description": "User's response"},
                "email": {"type": "string", "description": "User's email address"},
            },
            "required": ["username", "email"],
        }
        result = await ctx.session.elicit_form(message, schema, related_request_id=ctx.request_id)
        return f"User response: action={result.action}, content={json.dumps(result.content or {})}"

    @server.tool(description="Tests elicitation with default values for all primitive types (SEP-1034)")
    async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
        schema = {
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "User name", "default": "John Doe"},
                "age": {"type": "integer", "description": "User age", "default": 30},
                "score": {"type": "number", "description": "User score", "default": 95.5},
                "status": {
                    "type": "string",
                    "description": "User status",
                    "enum": ["active", "inactive", "pending"],
                    "default": "active",
                },
                "verified": {"type": "boolean", "description": "Verification status", "default": True},
            },
            "required": [],
        }
        result = await ctx.session.elicit_form(
            "Please review and update the form fields with defaults", schema, related_request_id=ctx.request_id
        )
        return f"Elicitation completed: action={result.action}, content={json.dumps(result.content or {})}"

    @server.tool(description="Tests elicitation with enum schema variations (SEP-1330)")
    async def test_elicitation_sep1330_enums(ctx: Context) -> str:
        schema = {
            "type": "object",
            "properties": {
                "untitledSingle": {"type": "string", "enum": ["option1", "option2", "option3"]},
                "titledSingle": {
                    "type": "string",
                    "oneOf": [
                        {"const": "value1", "title": "First Option"},
                        {"const": "value2", "title": "Second Option"},
                        {"const": "value3", "title": "Third Option"},
                    ],
                },
                "legacyEnum": {
                    "type": "string",
                    "enum": ["opt1", "opt2", "opt3"],
                    "enumNames": ["Option One", "Option Two", "Option Three"],
                },
                "untitledMulti": {
                    "type": "array",
                    "items": {"type": "string", "enum": ["option1", "option2", "option3"]},
                },
                "titledMulti": {
                    "type": "array",
                    "items": {
                        "anyOf": [
                            {"const": "value1", "title": "First Choice"},
                            {"const": "value2", "title": "Second Choice"},
                            {"const": "value3", "title": "Third Choice"},
                        ]
                    },
                },
            },
            "required": [],
        }
        result = await ctx.session.elicit_form(
            "Please select values using different enum schema types", schema, related_request_id=ctx.request_id
        )
        return f"Elicitation completed: action={result.action}, content={json.dumps(result.content or {})}"

    @server.tool(description="Closes the SSE stream mid-call; the result arrives after the client resumes (SEP-1699)")
    async def test_reconnection(ctx: Context) -> str:
        await ctx.info("Before disconnect")
        await ctx.close_sse_stream()
        await asyncio.sleep(0.2)
        await ctx.info("After reconnect")
        return "Reconnection test completed"


def _add_modern_tools(server: MCPServer) -> None:
    """Tools the 2026-07-28 scenarios call: stateless rules, subscriptions, InputRequiredResult."""

    @server.tool(description="Requires the client's sampling capability (-32021 without it)")
    async def test_missing_capability(ctx: Context) -> str:
        capabilities = ctx.client_capabilities
        if capabilities is None or capabilities.sampling is None:
            data = MissingRequiredClientCapabilityErrorData(
                required_capabilities=ClientCapabilities(sampling=SamplingCapability())
            )
            raise MCPError(
                MISSING_REQUIRED_CLIENT_CAPABILITY,
                "Client did not declare the sampling capability this tool needs",
                data.model_dump(by_alias=True, mode="json", exclude_none=True),
            )
        return "sampling capability present"

    @server.tool(description="Asks for input through InputRequiredResult, never an independent request")
    async def test_streaming_elicitation(ctx: Context) -> CallToolResult | InputRequiredResult:
        answer = _accepted(ctx, "confirm")
        if answer is None:
            request = _elicit("Continue?", {"ok": {"type": "boolean"}}, ["ok"])
            return InputRequiredResult(input_requests={"confirm": request})
        return _text(f"confirmed: {answer.get('ok')}")

    @server.tool(description="Logs only when the request's _meta asks for a log level")
    async def test_logging_tool(ctx: Context) -> str:
        await ctx.info("test_logging_tool ran")
        return "logged (if asked to)"

    dynamic_tool = {"present": False}

    @server.tool(description="Adds or removes a tool, so tools/list changes")
    async def test_trigger_tool_change(ctx: Context) -> str:
        if dynamic_tool["present"]:
            server.remove_tool("test_dynamic_tool")
        else:
            server.add_tool(lambda: "dynamic", name="test_dynamic_tool", description="Appears and disappears")
        dynamic_tool["present"] = not dynamic_tool["present"]
        await ctx.notify_tools_changed()
        return "tool list changed"

    dynamic_prompt = {"present": False}

    @server.tool(description="Adds or removes a prompt, so prompts/list changes")
    async def test_trigger_prompt_change(ctx: Context) -> str:
        if dynamic_prompt["present"]:
            server.remove_prompt("test_dynamic_prompt")
        else:
            server.prompt(name="test_dynamic_prompt", description="Appears and disappears")(lambda: "dynamic")
        dynamic_prompt["present"] = not dynamic_prompt["present"]
        await ctx.notify_prompts_changed()
        return "prompt list changed"

    @server.tool(description="One elicitation round (SEP-2322)")
    async def test_input_required_result_elicitation(ctx: Context) -> CallToolResult | InputRequiredResult:
        answer = _accepted(ctx, "user_name")
        if answer is None or "name" not in answer:
            request = _elicit("What is your name?", {"name": {"type": "string"}}, ["name"])
            return InputRequiredResult(input_requests={"user_name": request})
        return _text(f"Hello, {answer['name']}!")

    @server.tool(description="One sampling round (SEP-2322)")
    async def test_input_required_result_sampling(ctx: Context) -> CallToolResult | InputRequiredResult:
        text = _sampled_text(ctx, "capital_question")
        if text is None:
            request = _sample("What is the capital of France?", 100)
            return InputRequiredResult(input_requests={"capital_question": request})
        return _text(f"The model answered: {text}")

    @server.tool(description="One roots/list round (SEP-2322)")
    async def test_input_required_result_list_roots(ctx: Context) -> CallToolResult | InputRequiredResult:
        roots = _roots(ctx, "client_roots")
        if roots is None:
            return InputRequiredResult(input_requests={"client_roots": _list_roots()})
        return _text(f"Client roots: {', '.join(roots) if roots else '(none)'}")

    @server.tool(description="Round-trips requestState (SEP-2322)")
    async def test_input_required_result_request_state(ctx: Context) -> CallToolResult | InputRequiredResult:
        answer = _accepted(ctx, "confirm")
        if answer is None or ctx.request_state != "awaiting-confirm":
            request = _elicit("Please confirm", {"ok": {"type": "boolean"}}, ["ok"])
            return InputRequiredResult(input_requests={"confirm": request}, request_state="awaiting-confirm")
        return _text(f"state-ok: confirmed={answer.get('ok')}")

    @server.tool(description="Elicitation, sampling and roots in one round (SEP-2322)")
    async def test_input_required_result_multiple_inputs(ctx: Context) -> CallToolResult | InputRequiredResult:
        name = _accepted(ctx, "user_name")
        greeting = _sampled_text(ctx, "greeting")
        roots = _roots(ctx, "client_roots")
        if name is None or greeting is None or roots is None or ctx.request_state != "awaiting-three":
            requests = {
                "user_name": _elicit("What is your name?", {"name": {"type": "string"}}, ["name"]),
                "greeting": _sample("Generate a greeting", 50),
                "client_roots": _list_roots(),
            }
            return InputRequiredResult(input_requests=requests, request_state="awaiting-three")
        return _text(f"{greeting} {name.get('name')} ({len(roots)} roots)")

    @server.tool(description="Two elicitation rounds with evolving requestState (SEP-2322)")
    async def test_input_required_result_multi_round(ctx: Context) -> CallToolResult | InputRequiredResult:
        step1 = _accepted(ctx, "step1")
        step2 = _accepted(ctx, "step2")
        if ctx.request_state and ctx.request_state.startswith("round-2:") and step2 is not None:
            name = ctx.request_state.removeprefix("round-2:")
            return _text(f"{name} likes {step2.get('color')}")
        if ctx.request_state == "round-1" and step1 is not None:
            request = _elicit("Step 2: What is your favorite color?", {"color": {"type": "string"}}, ["color"])
            return InputRequiredResult(
                input_requests={"step2": request}, request_state=f"round-2:{step1.get('name')}"
            )
        request = _elicit("Step 1: What is your name?", {"name": {"type": "string"}}, ["name"])
        return InputRequiredResult(input_requests={"step1": request}, request_state="round-1")

    @server.tool(description="requestState is integrity-protected; a tampered one is refused (SEP-2322)")
    async def test_input_required_result_tampered_state(ctx: Context) -> CallToolResult | InputRequiredResult:
        # The SDK seals request_state on the way out and verifies it on the way in,
        # so a tampered token never reaches this body.
        answer = _accepted(ctx, "confirm")
        if answer is None or ctx.request_state != "sealed-state":
            request = _elicit("Please confirm", {"ok": {"type": "boolean"}}, ["ok"])
            return InputRequiredResult(input_requests={"confirm": request}, request_state="sealed-state")
        return _text("state verified")

    @server.tool(description="Asks only for what the client declared it can do (SEP-2322)")
    async def test_input_required_result_capabilities(ctx: Context) -> CallToolResult | InputRequiredResult:
        capabilities = ctx.client_capabilities
        requests: dict[str, Any] = {}
        if capabilities is not None and capabilities.elicitation is not None and _accepted(ctx, "user_name") is None:
            requests["user_name"] = _elicit("What is your name?", {"name": {"type": "string"}}, ["name"])
        if capabilities is not None and capabilities.sampling is not None and _sampled_text(ctx, "greeting") is None:
            requests["greeting"] = _sample("Generate a greeting", 50)
        if requests:
            return InputRequiredResult(input_requests=requests)
        return _text("nothing more to ask")


def _add_resources(server: MCPServer) -> None:
    @server.resource("test://static-text", description="A static text resource", mime_type="text/plain")
    def static_text() -> str:
        return "This is the content of the static text resource."

    @server.resource("test://static-binary", description="A static binary resource (a PNG)", mime_type="image/png")
    def static_binary() -> bytes:
        return base64.b64decode(PNG_BASE64)

    @server.resource(
        "test://template/{id}/data", description="A resource template with parameter substitution",
        mime_type="application/json",
    )
    def template_data(id: str) -> str:
        return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})

    @server.resource(
        "test://watched-resource", description="A resource that can be subscribed to", mime_type="text/plain"
    )
    def watched() -> str:
        return "Watched resource content"


def _add_prompts(server: MCPServer) -> None:
    @server.prompt(description="A simple prompt without arguments")
    def test_simple_prompt() -> list[UserMessage]:
        return [UserMessage(TextContent(type="text", text="This is a simple prompt for testing."))]

    @server.prompt(description="A prompt with required arguments")
    def test_prompt_with_arguments(arg1: str, arg2: str) -> list[UserMessage]:
        text = f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"
        return [UserMessage(TextContent(type="text", text=text))]

    @server.prompt(description="A prompt that includes an embedded resource")
    def test_prompt_with_embedded_resource(resourceUri: str) -> list[UserMessage]:  # noqa: N803 - the suite's name
        resource = TextResourceContents(
            uri=resourceUri, mime_type="text/plain", text="Embedded resource content for testing."
        )
        return [
            UserMessage(EmbeddedResource(type="resource", resource=resource)),
            UserMessage(TextContent(type="text", text="Please process the embedded resource above.")),
        ]

    @server.prompt(description="A prompt that includes image content")
    def test_prompt_with_image() -> list[UserMessage]:
        return [
            UserMessage(ImageContent(type="image", data=PNG_BASE64, mime_type="image/png")),
            UserMessage(TextContent(type="text", text="Please analyze the image above.")),
        ]

    @server.prompt(description="A prompt that needs elicited context first (SEP-2322)")
    def test_input_required_result_prompt(ctx: Context) -> list[UserMessage] | InputRequiredResult:
        answer = _accepted(ctx, "user_context")
        if answer is None:
            request = _elicit("What context should the prompt use?", {"context": {"type": "string"}}, ["context"])
            return InputRequiredResult(input_requests={"user_context": request})
        text = f"Use this context: {answer.get('context')}"
        return [UserMessage(TextContent(type="text", text=text))]

    @server.completion()
    async def complete(ref, argument, context) -> Completion:
        candidates = ["test", "testing", "tested", "paris", "park"]
        values = [value for value in candidates if value.startswith(argument.value or "")]
        return Completion(values=values, total=len(values), has_more=False)


def _add_legacy_methods(server: MCPServer) -> None:
    """Requests the 2026 revision removed but 2025-era clients send.

    MCPServer has no decorator for these; the SDK documents the low-level
    `Server.add_request_handler` as the way to serve them (see `MethodBinding`).
    """
    lowlevel = server._lowlevel_server  # noqa: SLF001 - the SDK's documented route for removed methods
    subscriptions: set[str] = set()

    async def set_level(ctx, params: SetLevelRequestParams) -> EmptyResult:
        return EmptyResult()

    async def subscribe(ctx, params: SubscribeRequestParams) -> EmptyResult:
        subscriptions.add(str(params.uri))
        return EmptyResult()

    async def unsubscribe(ctx, params: UnsubscribeRequestParams) -> EmptyResult:
        subscriptions.discard(str(params.uri))
        return EmptyResult()

    lowlevel.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)
    lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, unsubscribe)


class TrimFieldWhitespace:
    """ASGI wrapper: header values without the optional whitespace around them (RFC 9110 §5.5).

    The SDK compares `Mcp-Name` with the body as the HTTP parser handed it over, and
    uvicorn's parser keeps trailing blanks, so `Mcp-Name:  test_simple_text  ` would be
    refused; the suite (http-header-validation) requires it to be accepted.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            scope = dict(scope, headers=[(name, value.strip(b" \t")) for name, value in scope["headers"]])
        await self.app(scope, receive, send)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--json-response", action="store_true", help="answer with JSON instead of SSE")
    args = parser.parse_args(argv)
    app = build_server().streamable_http_app(
        json_response=args.json_response,
        event_store=MemoryEventStore(),
        retry_interval=100,  # ms: the SSE `retry:` a resuming client waits (SEP-1699)
        host=args.host,
    )
    uvicorn.run(TrimFieldWhitespace(app), host=args.host, port=args.port, log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
