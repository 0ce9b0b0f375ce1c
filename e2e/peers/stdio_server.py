"""A minimal MCP server over STDIO, written against the wire format (no SDK, so it starts in
milliseconds), with tools that misbehave on purpose:

    python3 stdio_server.py [--grandchild]

  echo     answers {"text": "Echo: <message>"}
  exit     exits in the middle of the request
  hang     never answers
  garbage  writes lines that are not JSON-RPC, then answers
  flood    sends 2,000 log notifications, then answers

With --grandchild it first starts a long-lived child of its own (as `npx` wrappers do), so a test
can check that stopping the server's process group reaches it.
"""

import json
import os
import subprocess
import sys


def send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def text(request_id, value: str) -> None:
    send({"jsonrpc": "2.0", "id": request_id, "result": {"content": [{"type": "text", "text": value}]}})


TOOLS = [{"name": name, "inputSchema": {"type": "object"}} for name in ["echo", "exit", "hang", "garbage", "flood", "pid"]]


def main() -> None:
    if "--grandchild" in sys.argv:
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    for line in sys.stdin:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        method, request_id = message.get("method"), message.get("id")
        if request_id is None:
            continue
        if method == "initialize":
            send({"jsonrpc": "2.0", "id": request_id, "result": {
                "protocolVersion": message["params"]["protocolVersion"],
                "capabilities": {"tools": {}, "logging": {}},
                "serverInfo": {"name": "reflow-stdio-test-server", "version": "0"}}})
        elif method == "tools/list":
            send({"jsonrpc": "2.0", "id": request_id, "result": {"tools": TOOLS}})
        elif method == "tools/call":
            name = message["params"]["name"]
            arguments = message["params"].get("arguments") or {}
            if name == "echo":
                text(request_id, f"Echo: {arguments.get('message', '')}")
            elif name == "pid":
                text(request_id, str(os.getpid()))
            elif name == "exit":
                os._exit(3)
            elif name == "hang":
                pass
            elif name == "garbage":
                sys.stdout.write("this is not JSON-RPC\n{broken json\n[1, 2, 3]\n")
                text(request_id, "after garbage")
            elif name == "flood":
                for i in range(2000):
                    send({"jsonrpc": "2.0", "method": "notifications/message",
                          "params": {"level": "info", "data": f"flood {i}"}})
                text(request_id, "after flood")
            else:
                send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32602, "message": f"unknown tool {name}"}})
        elif method == "ping":
            send({"jsonrpc": "2.0", "id": request_id, "result": {}})
        else:
            send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": "method not found"}})


if __name__ == "__main__":
    main()
