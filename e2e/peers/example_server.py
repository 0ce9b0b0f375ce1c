"""An MCP server written with the Python SDK (mcp 2.x, MCPServer) over Streamable HTTP: tools
with progress, elicitation and sampling, a resource, a template and a prompt.

    python example_server.py PORT [PATH]     # default path /mcp

Serves http://127.0.0.1:PORT/PATH (stateful, SSE responses). Prints uvicorn's
"Uvicorn running on http://127.0.0.1:PORT" on stderr when ready.
"""

import sys

import mcp_types as types
from mcp.server.mcpserver import Context, MCPServer
from pydantic import BaseModel

server = MCPServer("reflow-example-server", version="0.1.0", instructions="Example upstream for Reflow tests")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def echo(message: str, ctx: Context) -> str:
    """Echo the message back, with the Authorization header the server saw."""
    auth = (ctx.headers or {}).get("authorization")
    return f"echo: {message} (authorization: {auth})"


@server.tool()
async def slow(steps: int, ctx: Context) -> str:
    """Report progress `steps` times."""
    for i in range(1, steps + 1):
        await ctx.report_progress(i, steps, f"step {i}")
    return f"done {steps} steps"


grown = 0


@server.tool()
async def grow(ctx: Context) -> str:
    """Add a tool named grown_N and tell the client the tool list changed."""
    global grown
    grown += 1
    name = f"grown_{grown}"

    def grown_tool() -> str:
        return name

    server.add_tool(grown_tool, name=name, description="Added by grow.")
    await ctx.session.send_tool_list_changed()
    return name


class Answer(BaseModel):
    name: str


@server.tool()
async def ask(ctx: Context) -> str:
    """Elicit a name from the client."""
    result = await ctx.elicit("What is your name?", Answer)
    return f"{result.action}: {result.data.name if result.action == 'accept' else '-'}"


@server.tool()
async def sample(prompt: str, ctx: Context) -> str:
    """Ask the client's LLM (sampling/createMessage)."""
    result = await ctx.session.create_message(
        [types.SamplingMessage(role="user", content=types.TextContent(type="text", text=prompt))], max_tokens=50
    )
    return f"sampled: {result.content.text}"


@server.resource("example://greeting", mime_type="text/plain")
def greeting() -> str:
    return "Hello from the example server"


@server.resource("example://items/{item_id}")
def item(item_id: str) -> str:
    return f"item {item_id}"


@server.prompt()
def review(code: str) -> str:
    """Review some code."""
    return f"Please review:\n{code}"


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    path = sys.argv[2] if len(sys.argv) > 2 else "/mcp"
    server.run("streamable-http", host="127.0.0.1", port=port, streamable_http_path=path)
