"""An MCP server (Python SDK MCPServer) whose `headers` tool returns the HTTP headers it received,
and whose `meta` tool returns the request's `_meta`.

    python headers_server.py PORT

Serves http://127.0.0.1:PORT/mcp. Lets tests see exactly what the gateway sends upstream:
injected credentials, never the client's own token, and the trace context.
"""

import json
import sys

from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("reflow-headers-server", version="0.1.0")


@server.tool()
def headers(ctx: Context) -> str:
    """Return the request headers as JSON."""
    return json.dumps(dict(ctx.headers or {}), sort_keys=True)


@server.tool()
def meta(ctx: Context) -> str:
    """Return the request's _meta as JSON."""
    return json.dumps(dict(ctx.request_context.meta or {}), sort_keys=True, default=str)


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


if __name__ == "__main__":
    server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]), streamable_http_path="/mcp")
