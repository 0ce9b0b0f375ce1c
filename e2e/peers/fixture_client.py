"""The official MCP Python SDK client in one mode ("2026-07-28", "auto" or "legacy") against the
project's conformance fixture (conformance_server.py) through the gateway: one pass over tools,
progress, resources and prompts, printed as one JSON line for the test to check.

    python fixture_client.py URL TOKEN MODE [--input-required]

Prints {"version": ..., "tools": n, "text": ..., "progress": [...], "resource": ..., "cancelled": n,
"prompt": ..., "elicited": ..., "rounds": ...} or {"error": ...}. With --input-required it also
calls tools that ask the client for input the stateless era's way, once and in two rounds
(every elicitation answered "Ada").
"""

import json
import sys

import anyio
import httpx2
import mcp_types as types
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def main() -> None:
    url, token, mode = sys.argv[1], sys.argv[2], sys.argv[3]

    async def on_elicit(context, params):
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(30.0, read=60.0))
    out = {}
    try:
        async with Client(
            streamable_http_client(url, http_client=http),
            mode=mode,
            elicitation_callback=on_elicit,
            client_info=types.Implementation(name="reflow-fixture-client", version="0.1"),
            cache=None,
        ) as client:
            out["version"] = client.protocol_version
            out["tools"] = len((await client.list_tools()).tools)
            out["text"] = (await client.call_tool("test_simple_text", {})).content[0].text
            progress = []

            async def on_progress(value, total, message):
                progress.append(value)

            await client.call_tool("test_tool_with_progress", {}, progress_callback=on_progress)
            out["progress"] = progress
            read = await client.read_resource("test://static-text")
            out["resource"] = read.contents[0].text
            out["prompt"] = (await client.get_prompt("test_simple_prompt")).messages[0].content.text
            # A call the client gives up on is cancelled upstream (the fixture counts them).
            count = lambda result: int(result.content[0].text)  # noqa: E731
            before = count(await client.call_tool("test_cancelled_count", {}))
            with anyio.move_on_after(1):
                await client.call_tool("test_slow_operation", {})
            with anyio.move_on_after(10):
                while count(await client.call_tool("test_cancelled_count", {})) == before:
                    await anyio.sleep(0.2)
            out["cancelled"] = count(await client.call_tool("test_cancelled_count", {})) - before
            if "--input-required" in sys.argv:
                elicited = await client.call_tool("test_input_required_result_elicitation", {})
                out["elicited"] = elicited.content[0].text
                rounds = await client.call_tool("test_input_required_result_multi_round", {})
                out["rounds"] = rounds.content[0].text
    except Exception as error:  # noqa: BLE001 - reported to the test, which decides
        out["error"] = f"{type(error).__name__}: {error}"
    print(json.dumps(out), flush=True)
    await http.aclose()


if __name__ == "__main__":
    anyio.run(main)
