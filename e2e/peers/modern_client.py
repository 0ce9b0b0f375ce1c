"""The official MCP Python SDK client in one mode ("2026-07-28", "auto" or "legacy") against
server-everything through the gateway: one pass over what a client does, printed as one JSON
line for the test to check.

    python modern_client.py URL TOKEN MODE

Prints {"version": ..., "tools": n, "echo": text, "prompt": text, "resource": uri, "read": n,
"progress": [[p, total], ...], "sampled": text, "samplings": n, "elicited": text,
"elicitations": n, "headers": [...]} or {"error": ...}. "headers" lists the
Mcp-Session-Id headers the gateway sent (none in the stateless era).
"""

import json
import sys

import anyio
import httpx2
import mcp_types as types
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


def text_of(result) -> str:
    return "".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def main() -> None:
    url, token, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    samplings, elicitations, session_headers = [], [], []

    async def on_sample(context, params):
        samplings.append(params.messages[0].content.text)
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text="sampled reply"),
            model="test-model",
            stop_reason="endTurn",
        )

    async def on_elicit(context, params):
        elicitations.append(params.message)
        return types.ElicitResult(action="accept", content={"name": "Ada Lovelace"})

    async def remember(response):
        if "mcp-session-id" in response.headers:
            session_headers.append(response.headers["mcp-session-id"])

    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"},
        timeout=httpx2.Timeout(30.0, read=60.0),
        event_hooks={"response": [remember]},
    )
    out = {}
    try:
        async with Client(
            streamable_http_client(url, http_client=http),
            mode=mode,
            sampling_callback=on_sample,
            elicitation_callback=on_elicit,
            client_info=types.Implementation(name="reflow-modern", version="0.1"),
            cache=None,
        ) as client:
            out["version"] = client.protocol_version
            tools = await client.list_tools()
            out["tools"] = len(tools.tools)
            out["echo"] = text_of(await client.call_tool("echo", {"message": "hello modern"}))
            prompts = await client.list_prompts()
            simple = next(p for p in prompts.prompts if not any(a.required for a in (p.arguments or [])))
            got = await client.get_prompt(simple.name)
            out["prompt"] = got.messages[0].content.text
            resources = await client.list_resources()
            first = resources.resources[0]
            out["resource"] = str(first.uri)
            out["read"] = len((await client.read_resource(first.uri)).contents)
            progress = []

            async def on_progress(value, total, message):
                progress.append([value, total])

            result = await client.call_tool(
                "trigger-long-running-operation", {"duration": 1, "steps": 4}, progress_callback=on_progress
            )
            out["progress"] = progress
            out["long"] = text_of(result)
            sampled = await client.call_tool("trigger-sampling-request", {"prompt": "Say hi", "maxTokens": 20})
            out["sampled"] = text_of(sampled)
            out["samplings"] = len(samplings)
            elicited = await client.call_tool("trigger-elicitation-request", {})
            out["elicited"] = text_of(elicited)
            out["elicitations"] = len(elicitations)
    except Exception as error:  # noqa: BLE001 - reported to the test, which decides
        out["error"] = f"{type(error).__name__}: {error}"
    out["headers"] = session_headers
    print(json.dumps(out), flush=True)
    await http.aclose()


if __name__ == "__main__":
    anyio.run(main)
