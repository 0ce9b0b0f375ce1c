"""Low-level MCP server (Python SDK mcp 2.x) whose tools/list and resources/list are paginated.

    .peers/venv/bin/python e2e/peers/paged_server.py PORT [N_TOOLS] [PAGE_SIZE]

Serves http://127.0.0.1:PORT/mcp with tools tool-000..tool-(N-1) and resources
page://item/000.. in pages of PAGE_SIZE (default 25 tools, page size 10). The cursor is the
decimal offset of the next page. Each tool returns "<name>: <arguments JSON>".
"""

import json
import sys

import mcp_types as types
import uvicorn
from mcp.server import Server

N = int(sys.argv[2]) if len(sys.argv) > 2 else 25
PAGE = int(sys.argv[3]) if len(sys.argv) > 3 else 10
SCHEMA = {"type": "object", "properties": {"x": {"type": "string"}}}


def page(params: types.PaginatedRequestParams | None) -> tuple[range, str | None]:
    start = int(params.cursor) if params and params.cursor else 0
    end = min(start + PAGE, N)
    return range(start, end), (str(end) if end < N else None)


async def list_tools(ctx, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
    ids, next_cursor = page(params)
    tools = [types.Tool(name=f"tool-{i:03}", description=f"tool {i}", input_schema=SCHEMA) for i in ids]
    return types.ListToolsResult(tools=tools, next_cursor=next_cursor)


async def call_tool(ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
    text = f"{params.name}: {json.dumps(params.arguments or {}, sort_keys=True)}"
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)])


async def list_resources(ctx, params: types.PaginatedRequestParams | None) -> types.ListResourcesResult:
    ids, next_cursor = page(params)
    resources = [types.Resource(name=f"item-{i:03}", uri=f"page://item/{i:03}", mime_type="text/plain") for i in ids]
    return types.ListResourcesResult(resources=resources, next_cursor=next_cursor)


async def read_resource(ctx, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
    return types.ReadResourceResult(
        contents=[types.TextResourceContents(uri=str(params.uri), mime_type="text/plain", text=f"content of {params.uri}")]
    )


server = Server(
    "reflow-paged-server",
    version="0.1.0",
    on_list_tools=list_tools,
    on_call_tool=call_tool,
    on_list_resources=list_resources,
    on_read_resource=read_resource,
)

if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    app = server.streamable_http_app(streamable_http_path="/mcp", host="127.0.0.1")
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info")
