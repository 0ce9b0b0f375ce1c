"""The project's conformance fixture: an MCP server on the official Python SDK (2.x) serving both
protocol eras on one endpoint (the SDK routes on MCP-Protocol-Version: 2025-11-25 sessions with
initialize, 2026-07-28 stateless requests), with the `test_*` tools, resources and prompts the
official conformance suite's server scenarios call. The suite's own reference server lives in
its repository, not in its npm package; this one lets the suite run here, against this server
alone and through the gateway.

    python conformance_server.py PORT [--stateless] [--modern-only | --session-only]   serves http://127.0.0.1:PORT/mcp
"""
import json
import sys

import anyio
import uvicorn
from mcp.server.caching import CacheHint
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.prompts.base import UserMessage
from mcp.shared.exceptions import MCPError
from mcp.types import (
    AudioContent,
    Completion,
    CreateMessageRequest,
    CreateMessageRequestParams,
    ElicitRequest,
    ElicitRequestFormParams,
    EmbeddedResource,
    ImageContent,
    InputRequiredResult,
    ListRootsRequest,
    SamplingMessage,
    TextContent,
    TextResourceContents,
)

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
WAV = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA="

# Its tool list may be cached for a minute by anyone: what a gateway must pass on as it is.
mcp = MCPServer(
    "conformance-fixture",
    version="1.0.0",
    cache_hints={"tools/list": CacheHint(ttl_ms=60_000, scope="public")},
)


def elicit(message: str, prop: str, typ: str = "string") -> ElicitRequest:
    return ElicitRequest(
        params=ElicitRequestFormParams(
            message=message,
            requested_schema={"type": "object", "properties": {prop: {"type": typ}}, "required": [prop]},
        )
    )


def sample(text: str, max_tokens: int) -> CreateMessageRequest:
    return CreateMessageRequest(
        params=CreateMessageRequestParams(
            messages=[SamplingMessage(role="user", content=TextContent(type="text", text=text))],
            max_tokens=max_tokens,
        )
    )


def answer(ctx: Context, key: str):
    """The InputResponse for `key` as a plain dict, or None."""
    r = (ctx.input_responses or {}).get(key)
    return None if r is None else r.model_dump(by_alias=True, exclude_none=True)


@mcp.tool()
def test_simple_text() -> str:
    """Tests simple text content response"""
    return "This is a simple text response for testing."


@mcp.tool()
def test_image_content() -> list[ImageContent]:
    """Tests image content response"""
    return [ImageContent(type="image", data=PNG, mime_type="image/png")]


@mcp.tool()
def test_audio_content() -> list[AudioContent]:
    """Tests audio content response"""
    return [AudioContent(type="audio", data=WAV, mime_type="audio/wav")]


@mcp.tool()
def test_embedded_resource() -> list[EmbeddedResource]:
    """Tests embedded resource content response"""
    return [EmbeddedResource(type="resource", resource=TextResourceContents(
        uri="test://embedded-resource", mime_type="text/plain", text="This is an embedded resource content."))]


@mcp.tool()
def test_multiple_content_types() -> list[TextContent | ImageContent | EmbeddedResource]:
    """Tests response with multiple content types (text, image, resource)"""
    return [
        TextContent(type="text", text="Multiple content types test:"),
        ImageContent(type="image", data=PNG, mime_type="image/png"),
        EmbeddedResource(type="resource", resource=TextResourceContents(
            uri="test://mixed-content-resource", mime_type="application/json", text='{"test":"data","value":123}')),
    ]


@mcp.tool()
def test_error_handling() -> str:
    """Tests error response handling"""
    raise ToolError("This tool intentionally returns an error for testing")


@mcp.tool()
async def test_tool_with_progress(ctx: Context) -> str:
    """Tests tool that reports progress notifications"""
    for p in (0, 50, 100):
        await ctx.report_progress(p, 100, f"Completed step {p} of 100")
        if p < 100:
            await anyio.sleep(0.05)
    return "progress done"


@mcp.tool()
def test_missing_capability(ctx: Context) -> str:
    """Test tool requiring sampling"""
    caps = ctx.client_capabilities
    if caps is None or caps.sampling is None:
        raise MCPError(-32021, "MissingRequiredClientCapabilityError", {"requiredCapabilities": {"sampling": {}}})
    return "Success"


@mcp.tool()
def test_input_required_result_elicitation(ctx: Context) -> str | InputRequiredResult:
    """MRTR: elicitation"""
    if (a := answer(ctx, "user_name")) and isinstance(a.get("content"), dict):
        return f"Hello, {a['content'].get('name', 'unknown')}!"
    return InputRequiredResult(input_requests={"user_name": elicit("What is your name?", "name")})


@mcp.tool()
def test_input_required_result_sampling(ctx: Context) -> str | InputRequiredResult:
    """MRTR: sampling"""
    if a := answer(ctx, "capital_question"):
        return f"Sampling result: {a.get('content', {}).get('text', 'no response')}"
    return InputRequiredResult(input_requests={"capital_question": sample("What is the capital of France?", 100)})


@mcp.tool()
def test_input_required_result_list_roots(ctx: Context) -> str | InputRequiredResult:
    """MRTR: roots/list"""
    if a := answer(ctx, "client_roots"):
        return f"Found {len(a.get('roots', []))} root(s)"
    return InputRequiredResult(input_requests={"client_roots": ListRootsRequest()})


@mcp.tool()
def test_input_required_result_request_state(ctx: Context) -> str | InputRequiredResult:
    """MRTR: requestState round trip"""
    if ctx.request_state == "request-state" and answer(ctx, "confirm"):
        return "state-ok: requestState validated"
    return InputRequiredResult(input_requests={"confirm": elicit("Please confirm", "ok", "boolean")},
                               request_state="request-state")  # sealed by the SDK (AES-GCM) on the wire


@mcp.tool()
def test_input_required_result_tampered_state(ctx: Context) -> str | InputRequiredResult:
    """MRTR: a tampered requestState is rejected by the SDK boundary (-32602) before this runs"""
    if ctx.request_state == "tamper-test" and answer(ctx, "confirm"):
        return "integrity-ok: state verified"
    return InputRequiredResult(input_requests={"confirm": elicit("Please confirm", "ok", "boolean")},
                               request_state="tamper-test")


@mcp.tool()
def test_input_required_result_multiple_inputs(ctx: Context) -> str | InputRequiredResult:
    """MRTR: three input requests in one round"""
    if ctx.request_state == "multiple-inputs" and all(answer(ctx, k) for k in ("user_name", "greeting", "client_roots")):
        return "all inputs received"
    return InputRequiredResult(
        input_requests={"user_name": elicit("What is your name?", "name"),
                        "greeting": sample("Generate a greeting", 50),
                        "client_roots": ListRootsRequest()},
        request_state="multiple-inputs")


@mcp.tool()
def test_input_required_result_multi_round(ctx: Context) -> str | InputRequiredResult:
    """MRTR: two rounds"""
    if ctx.request_state == "round-1" and answer(ctx, "step1"):
        return InputRequiredResult(input_requests={"step2": elicit("Step 2: What is your favorite color?", "color")},
                                   request_state="round-2")
    if ctx.request_state == "round-2" and answer(ctx, "step2"):
        return "Multi-round complete"
    return InputRequiredResult(input_requests={"step1": elicit("Step 1: What is your name?", "name")},
                               request_state="round-1")


@mcp.tool()
def test_input_required_result_capabilities(ctx: Context) -> str | InputRequiredResult:
    """MRTR: only ask for declared capabilities"""
    if ctx.input_responses:
        return "capabilities-ok"
    caps, reqs = ctx.client_capabilities, {}
    if caps and caps.elicitation is not None:
        reqs["elicit_input"] = elicit("Elicitation input", "value")
    if caps and caps.sampling is not None:
        reqs["sample_input"] = sample("Sample request", 50)
    return InputRequiredResult(input_requests=reqs, request_state="caps") if reqs else "No supported capabilities declared"


@mcp.tool()
def test_streaming_elicitation() -> str:
    """Diagnostic: response stream carries no server->client requests"""
    return "Streaming complete"


@mcp.tool()
def test_logging_tool() -> str:
    """Diagnostic: no notifications/message without _meta logLevel"""
    return "Logging evaluated"


@mcp.tool()
async def test_trigger_tool_change(ctx: Context) -> str:
    """Publishes tools/list_changed to subscriptions/listen streams"""
    await ctx.notify_tools_changed()
    return "Mutation triggered"


@mcp.tool()
async def test_trigger_prompt_change(ctx: Context) -> str:
    """Publishes prompts/list_changed to subscriptions/listen streams"""
    await ctx.notify_prompts_changed()
    return "Mutation triggered"


CANCELLED = []


@mcp.tool()
async def test_slow_operation() -> str:
    """Not one of the suite's: waits 30 s, counting the calls cancelled meanwhile"""
    try:
        await anyio.sleep(30)
    except anyio.get_cancelled_exc_class():
        CANCELLED.append(1)
        raise
    return "slow done"


@mcp.tool()
def test_many_inputs(ctx: Context) -> str | InputRequiredResult:
    """Not one of the suite's: asks 17 questions at once"""
    if ctx.input_responses:
        return "answered"
    return InputRequiredResult(input_requests={f"q{n}": elicit(f"Question {n}?", "answer") for n in range(17)})


@mcp.tool()
def test_cancelled_count() -> str:
    """Not one of the suite's: how many test_slow_operation calls were cancelled"""
    return str(len(CANCELLED))


@mcp.resource("test://static-text", mime_type="text/plain", description="A static text resource for testing")
def static_text() -> str:
    return "This is the content of the static text resource."


@mcp.resource("test://static-binary", mime_type="image/png", description="A static binary resource (image) for testing")
def static_binary() -> bytes:
    import base64
    return base64.b64decode(PNG)


@mcp.resource("test://template/{id}/data", mime_type="application/json", description="A resource template")
def template(id: str) -> str:
    return '{"id":"%s","templateTest":true,"data":"Data for ID: %s"}' % (id, id)


@mcp.prompt(description="A simple prompt without arguments")
def test_simple_prompt() -> str:
    return "This is a simple prompt for testing."


@mcp.prompt(description="A prompt with required arguments")
def test_prompt_with_arguments(arg1: str, arg2: str) -> str:
    return f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"


@mcp.prompt(description="A prompt that includes an embedded resource")
def test_prompt_with_embedded_resource(resourceUri: str) -> list[UserMessage]:
    return [
        UserMessage(content=EmbeddedResource(type="resource", resource=TextResourceContents(
            uri=resourceUri, mime_type="text/plain", text="Embedded resource content for testing."))),
        UserMessage(content="Please process the embedded resource above."),
    ]


@mcp.prompt(description="A prompt that includes image content")
def test_prompt_with_image() -> list[UserMessage]:
    return [UserMessage(content=ImageContent(type="image", data=PNG, mime_type="image/png")),
            UserMessage(content="Please analyze the image above.")]


@mcp.prompt(description="MRTR: prompt that requires elicitation input")
def test_input_required_result_prompt(ctx: Context) -> str | InputRequiredResult:
    if a := answer(ctx, "user_context"):
        return f"Prompt with context: {a.get('content', {}).get('context')}"
    return InputRequiredResult(input_requests={
        "user_context": elicit("What context should the prompt use?", "context")})


@mcp.completion()
async def complete(ref, argument, context):
    return Completion(values=[], total=0, has_more=False)


def session_only(app):
    """With --session-only the server is one of the session era alone, as most servers today
    are: a request naming 2026-07-28 gets 400 without a JSON-RPC body."""

    async def guarded(scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            if headers.get(b"mcp-protocol-version") == b"2026-07-28":
                await send({"type": "http.response.start", "status": 400, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
        await app(scope, receive, send)

    return guarded


def modern_only(app):
    """The SDK serves both eras on one endpoint; with --modern-only this guard makes the server
    one of the stateless era alone, as servers written for 2026-07-28 only are: a request whose
    MCP-Protocol-Version is not 2026-07-28 (an initialize, a GET stream, a DELETE) gets 400."""

    async def guarded(scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            if headers.get(b"mcp-protocol-version") != b"2026-07-28":
                body = json.dumps({"jsonrpc": "2.0", "error": {
                    "code": -32020, "message": "MCP-Protocol-Version 2026-07-28 is required: this server has no sessions"}})
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body.encode()})
                return
        await app(scope, receive, send)

    return guarded


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    # stateless_http: session-era traffic is served without Mcp-Session-Id; the 2026-07-28 path
    # is always stateless.
    app = mcp.streamable_http_app(stateless_http="--stateless" in sys.argv, host="127.0.0.1")
    if "--modern-only" in sys.argv:
        app = modern_only(app)
    if "--session-only" in sys.argv:
        app = session_only(app)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
