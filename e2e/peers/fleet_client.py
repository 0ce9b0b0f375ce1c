"""One long session of the official MCP Python SDK client against server-everything, driven
command by command, for the fleet test (the session's requests land on several data planes).

    python fleet_client.py URL TOKEN

Reads one command per line on stdin and prints one JSON line for each:
  session       {"session": <Mcp-Session-Id>}
  lists         {"tools": n, "prompts": n, "resources": n}
  echo N        {"echoed": n, "errors": [...]}: N echo calls, each checked
  progress      {"text": ..., "progress": [[p, total], ...]}: a long-running, progress-reporting tool
  sample        {"text": ..., "samplings": n}: a tool whose server asks the client to sample
Any failure prints {"error": ...} instead. Exits at end of input (closing the session).
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
    samplings = []

    async def on_sample(context, params):
        samplings.append(params.messages[0].content.text)
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text="sampled reply"),
            model="test-model",
            stop_reason="endTurn",
        )

    session_ids = []

    async def remember(response):
        if "mcp-session-id" in response.headers:
            session_ids.append(response.headers["mcp-session-id"])

    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"},
        timeout=httpx2.Timeout(30.0, read=60.0),
        event_hooks={"response": [remember]},
    )
    transport = streamable_http_client(url, http_client=http)
    async with Client(
        transport,
        mode="legacy",
        sampling_callback=on_sample,
        client_info=types.Implementation(name="reflow-fleet", version="0.1"),
        cache=None,
    ) as client:
        say({"connected": True})
        stdin = anyio.wrap_file(sys.stdin)
        async for line in stdin:
            command, _, argument = line.strip().partition(" ")
            if not command:
                continue
            try:
                if command == "session":
                    say({"session": session_ids[0] if session_ids else None, "seen": sorted(set(session_ids))})
                elif command == "lists":
                    tools = await client.list_tools()
                    prompts = await client.list_prompts()
                    resources = await client.list_resources()
                    say({"tools": len(tools.tools), "prompts": len(prompts.prompts), "resources": len(resources.resources)})
                elif command == "echo":
                    errors = []
                    for n in range(int(argument)):
                        result = await client.call_tool("echo", {"message": f"m{n}"})
                        text = "".join(c.text for c in result.content if isinstance(c, types.TextContent))
                        if result.is_error or f"m{n}" not in text:
                            errors.append(text)
                    say({"echoed": int(argument), "errors": errors})
                elif command == "progress":
                    progress = []

                    async def on_progress(value, total, message):
                        progress.append([value, total])

                    result = await client.call_tool(
                        "trigger-long-running-operation", {"duration": 3, "steps": 6}, progress_callback=on_progress
                    )
                    say({"text": result.content[0].text, "progress": progress})
                elif command == "sample":
                    result = await client.call_tool("trigger-sampling-request", {"prompt": "Say hi", "maxTokens": 20})
                    say({"text": result.content[0].text, "samplings": len(samplings)})
                else:
                    say({"error": f"unknown command {command}"})
            except Exception as error:  # noqa: BLE001 - reported to the test, which decides
                say({"error": f"{type(error).__name__}: {error}"})
    await http.aclose()


if __name__ == "__main__":
    anyio.run(main)
