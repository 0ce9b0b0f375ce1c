"""The MCP server the Kubernetes tests' pods stand for (the image `reflow-test/env-server`), run
by the test node agent as a local process: the Python SDK (MCPServer) over Streamable HTTP on
POD_IP:MCP_PORT, the address the agent gave the pod.

  env     the values of the named environment variables (absent ones as null), as JSON
  whoami  the process's pid, POD_NAME and the address it serves
"""

import json
import os

from mcp.server.mcpserver import MCPServer
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

server = MCPServer("reflow-pod-server", version="0.1.0")


@server.tool()
def env(names: list[str]) -> str:
    """The values of the named environment variables."""
    return json.dumps({name: os.environ.get(name) for name in names}, sort_keys=True)


@server.tool()
def whoami() -> str:
    """Which process (and pod) answered."""
    return json.dumps({"pid": os.getpid(), "pod": os.environ.get("POD_NAME"),
                       "address": f"{os.environ['POD_IP']}:{os.environ['MCP_PORT']}"})


@server.tool()
def environment_keys() -> str:
    """Every environment variable's name (never the values)."""
    return json.dumps(sorted(os.environ))


@server.custom_route("/health", methods=["GET"])
async def health(request: Request) -> Response:
    """The readiness probe's path."""
    return JSONResponse({"status": "ok"})


if __name__ == "__main__":
    server.run("streamable-http", host=os.environ["POD_IP"], port=int(os.environ["MCP_PORT"]))
