"""Drives the official MCP Python SDK client through the gateway and prints one JSON report.

    python client.py URL TOKEN [--sse] [--prefix everything_] [--uri-prefix reflow+everything+] [--python-server]

The upstream is server-everything, or with --python-server the Python SDK server of
example_server.py. The report holds what the client saw; the Rust test decides
what is right. Nothing here asserts, so a failure shows up as a wrong or missing field.
"""

import json
import sys

import anyio
import httpx2
import mcp_types as types
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client


def arg(name: str, default: str = "") -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


async def main() -> None:
    url, token = sys.argv[1], sys.argv[2]
    prefix, uri_prefix = arg("--prefix"), arg("--uri-prefix")
    report: dict = {"progress": [], "elicitations": [], "samplings": []}

    async def on_elicit(context, params):
        report["elicitations"].append(params.message)
        return types.ElicitResult(action="accept", content={"name": "Ada Lovelace", "check": True, "integer": 7})

    async def on_sample(context, params):
        report["samplings"].append(params.messages[0].content.text)
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text="sampled reply"),
            model="test-model",
            stop_reason="endTurn",
        )

    async def on_progress(progress, total, message):
        report["progress"].append([progress, total])

    headers = {"Authorization": f"Bearer {token}"}
    http = None
    if "--sse" in sys.argv:
        transport = sse_client(url, headers=headers)
    else:
        http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=120.0))
        transport = streamable_http_client(url, http_client=http)
    async with Client(
        transport,
        mode="legacy",
        elicitation_callback=on_elicit,
        sampling_callback=on_sample,
        client_info=types.Implementation(name="reflow-e2e", version="0.1"),
        cache=None,
    ) as client:
        if "--python-server" in sys.argv:
            await python_server(client, prefix, uri_prefix, report, on_progress)
        else:
            await everything(client, prefix, uri_prefix, report, on_progress)
    if http is not None:
        await http.aclose()
    print(json.dumps(report))


async def python_server(client, prefix, uri_prefix, report, on_progress) -> None:
    """The example server of e2e/peers/example_server.py."""
    tools = await client.list_tools()
    report["tools"] = sorted(t.name for t in tools.tools)
    result = await client.call_tool(f"{prefix}add", {"a": 2, "b": 3})
    report["add"] = result.content[0].text
    result = await client.call_tool(f"{prefix}slow", {"steps": 3}, progress_callback=on_progress)
    report["slow"] = result.content[0].text
    result = await client.call_tool(f"{prefix}ask", {})
    report["ask"] = result.content[0].text
    result = await client.call_tool(f"{prefix}sample", {"prompt": "Say hi"})
    report["sample"] = result.content[0].text
    read = await client.read_resource(f"{uri_prefix}example://greeting")
    report["greeting"] = read.contents[0].text
    read = await client.read_resource(f"{uri_prefix}example://items/42")
    report["item"] = read.contents[0].text
    prompt = await client.get_prompt(f"{prefix}review", {"code": "x = 1"})
    report["prompt"] = prompt.messages[0].content.text


async def every_page(list_method, field: str) -> tuple[list, int]:
    """Follows cursors to the end: (every item, number of pages)."""
    items, cursor, pages = [], None, 0
    while True:
        page = await list_method(cursor=cursor)
        pages += 1
        items += getattr(page, field)
        cursor = page.next_cursor
        if cursor is None:
            return items, pages


async def everything(client, prefix, uri_prefix, report, on_progress) -> None:
    """server-everything."""
    report["protocol_version"] = client.protocol_version
    report["server"] = client.server_info.name if client.server_info else None
    tools, pages = await every_page(client.list_tools, "tools")
    report["tools"] = sorted(t.name for t in tools)
    report["tool_pages"] = pages
    echo = next((t for t in tools if t.name == f"{prefix}echo"), None)
    report["echo_schema"] = echo.input_schema if echo else None

    result = await client.call_tool(f"{prefix}echo", {"message": "hello"})
    report["echo"] = [c.text for c in result.content if isinstance(c, types.TextContent)]
    result = await client.call_tool(
        f"{prefix}trigger-long-running-operation", {"duration": 1, "steps": 3}, progress_callback=on_progress
    )
    report["long_running"] = result.content[0].text
    result = await client.call_tool(f"{prefix}trigger-elicitation-request", {})
    report["elicitation_result"] = result.content[0].text
    result = await client.call_tool(f"{prefix}trigger-sampling-request", {"prompt": "Say hi", "maxTokens": 20})
    report["sampling_result"] = result.content[0].text
    result = await client.call_tool(f"{prefix}get-resource-links", {"count": 1})
    report["resource_links"] = [str(c.uri) for c in result.content if getattr(c, "type", "") == "resource_link"]

    resources, _ = await every_page(client.list_resources, "resources")
    report["resources"] = sorted(str(r.uri) for r in resources)
    templates = await client.list_resource_templates()
    report["templates"] = sorted(t.uri_template for t in templates.resource_templates)
    read = await client.read_resource(f"{uri_prefix}demo://resource/dynamic/text/1")
    report["read"] = {"uri": str(read.contents[0].uri), "text": read.contents[0].text}
    if report["resource_links"]:
        linked = await client.read_resource(report["resource_links"][0])
        report["read_link"] = str(linked.contents[0].uri)

    prompts = await client.list_prompts()
    report["prompts"] = sorted(p.name for p in prompts.prompts)
    prompt = await client.get_prompt(f"{prefix}args-prompt", {"city": "Paris"})
    report["prompt"] = prompt.messages[0].content.text
    try:
        await client.call_tool("nope_missing", {})
        report["unknown_tool"] = "no error"
    except Exception as error:  # the SDK raises on JSON-RPC errors
        report["unknown_tool"] = str(error)


if __name__ == "__main__":
    anyio.run(main)
