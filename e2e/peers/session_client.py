"""Holds one session of the official MCP Python SDK client open and calls tools on command.

    python session_client.py URL TOKEN

Reads one command per line on stdin, `TOOL JSON-ARGUMENTS`, calls the tool in the same
session and prints one JSON line: {"text": ...} with the result's text, {"error": ...} when the
call failed or was refused, and {"session": ...} with the gateway session id after connecting.
Lets a test change things between calls (a user's groups, a credential) and see what the same
client session gets next. Exits at end of input.
"""

import json
import sys

import anyio
import httpx2
import mcp_types as types
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


def say(value: dict) -> None:
    print(json.dumps(value), flush=True)


async def main() -> None:
    url, token = sys.argv[1], sys.argv[2]
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(30.0, read=60.0))
    transport = streamable_http_client(url, http_client=http)
    async with Client(
        transport, mode="legacy", client_info=types.Implementation(name="reflow-e2e", version="0.1"), cache=None
    ) as client:
        await client.list_tools()
        say({"connected": True})
        stdin = anyio.wrap_file(sys.stdin)
        async for line in stdin:
            line = line.strip()
            if not line:
                continue
            name, _, arguments = line.partition(" ")
            try:
                result = await client.call_tool(name, json.loads(arguments or "{}"))
            except Exception as error:  # a refusal arrives as an MCP error
                say({"error": str(error)})
                continue
            text = "".join(c.text for c in result.content if isinstance(c, types.TextContent))
            say({"error": text} if result.is_error else {"text": text})


if __name__ == "__main__":
    anyio.run(main)
