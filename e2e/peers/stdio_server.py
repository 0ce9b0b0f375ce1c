"""A minimal MCP server over STDIO, written against the wire format (no SDK, so it starts in
milliseconds), with tools that misbehave on purpose:

    python3 stdio_server.py [--grandchild]

  echo     answers {"text": "Echo: <message>"}
  exit     writes a last line to stderr (with its API_KEY) and exits in the middle of the request
  hang     never answers
  garbage  writes lines that are not JSON-RPC, then answers
  flood    sends 2,000 log notifications, then answers
  whereami its working directory, HOME, TMPDIR, uid, and whether it can read `path`
  limits   its /proc/self/limits
  forkbomb forks up to `count` sleeping children (until the OS refuses); answers how many it got
  slow     sends 3 progress notifications with the call's token, then answers after `ms`
           milliseconds, unless a notifications/cancelled for it arrived first

With --touch PATH it appends its pid to PATH as it starts (so a test can count its starts). With
--grandchild it first starts a long-lived child of its own (as `npx` wrappers do), so a test
can check that stopping the server's process group reaches it. With --slow-start SECONDS it waits
that long before reading anything (a slow start).
"""

import json
import os
import subprocess
import sys
import threading
import time

LOCK = threading.Lock()
CANCELLED = set()


def send(message: dict) -> None:
    with LOCK:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


def slow(request_id, token, ms: int) -> None:
    for i in range(3):
        if token is not None:
            send({"jsonrpc": "2.0", "method": "notifications/progress",
                  "params": {"progressToken": token, "progress": i + 1, "total": 3}})
    time.sleep(ms / 1000)
    if request_id in CANCELLED:
        return
    text(request_id, f"slow done {request_id}")


def forkbomb(count: int) -> int:
    started = 0
    for _ in range(count):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        started += 1
    return started


def text(request_id, value: str) -> None:
    send({"jsonrpc": "2.0", "id": request_id, "result": {"content": [{"type": "text", "text": value}]}})


TOOLS = [{"name": name, "inputSchema": {"type": "object"}}
         for name in ["echo", "exit", "hang", "garbage", "flood", "pid", "whereami", "limits", "forkbomb", "slow"]]


def main() -> None:
    if "--grandchild" in sys.argv:
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    if "--touch" in sys.argv:
        with open(sys.argv[sys.argv.index("--touch") + 1], "a") as started:
            started.write(f"{os.getpid()}\n")
    if "--slow-start" in sys.argv:
        time.sleep(float(sys.argv[sys.argv.index("--slow-start") + 1]))
    for line in sys.stdin:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        method, request_id = message.get("method"), message.get("id")
        if method == "notifications/cancelled":
            CANCELLED.add(message.get("params", {}).get("requestId"))
            continue
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
            elif name == "whereami":
                path = arguments.get("path")
                readable = False
                if path:
                    try:
                        with open(path, "rb") as f:
                            f.read(1)
                        readable = True
                    except OSError:
                        pass
                text(request_id, json.dumps({"cwd": os.getcwd(), "home": os.environ.get("HOME"),
                                             "tmpdir": os.environ.get("TMPDIR"), "uid": os.getuid(),
                                             "readable": readable}))
            elif name == "limits":
                with open("/proc/self/limits") as f:
                    text(request_id, f.read())
            elif name == "forkbomb":
                text(request_id, str(forkbomb(int(arguments.get("count", 100)))))
            elif name == "slow":
                token = (message["params"].get("_meta") or {}).get("progressToken")
                threading.Thread(target=slow, args=(request_id, token, int(arguments.get("ms", 500))), daemon=True).start()
            elif name == "exit":
                # Says why on stderr, as servers do, naming its API_KEY (which must not show).
                sys.stderr.write(f"fatal: giving up (API_KEY={os.environ.get('API_KEY', '')})\n")
                sys.stderr.flush()
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
