"""A Python SDK (mcp 2.x) server with resumable streams (an in-memory event store): a tool that
closes its call's SSE stream before its result and expects the client to come back for it with
GET + Last-Event-ID (SEP-1699 polling), as the conformance suite's `test_reconnection` tool
does, and a slow tool whose stream a client may lose and resume.

    python polling_server.py PORT

Serves http://127.0.0.1:PORT/mcp (stateful, SSE responses, an in-memory event store, retry
200 ms). Prints uvicorn's "Uvicorn running on ..." on stderr when ready.
"""

import itertools
import sys

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import EventMessage, EventStore

server = MCPServer("reflow-polling-server", version="0.1.0")


class MemoryEventStore(EventStore):
    """Every event of every stream, in order; replays a stream's events after a given one."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, object]] = []
        self.ids = itertools.count(1)

    async def store_event(self, stream_id, message):
        event_id = f"ev-{next(self.ids)}"
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id, send_callback):
        found = next((i for i, (eid, _, _) in enumerate(self.events) if eid == last_event_id), None)
        if found is None:
            return None
        stream_id = self.events[found][1]
        for event_id, stream, message in self.events[found + 1 :]:
            if stream == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


@server.tool()
async def test_reconnection(ctx: Context) -> str:
    """Report progress, close the stream, and answer after the client has gone away."""
    await ctx.report_progress(1, 2, "before the stream closes")
    await ctx.close_sse_stream()
    await anyio.sleep(0.5)
    await ctx.report_progress(2, 2, "after the stream closed")
    return "reconnected: the result arrived after the stream closed"


@server.tool()
async def slow_steps(steps: int, ctx: Context) -> str:
    """Report progress `steps` times, 0.3 s apart, then answer."""
    for i in range(1, steps + 1):
        await ctx.report_progress(i, steps, f"step {i}")
        await anyio.sleep(0.3)
    return f"finished {steps} steps"


@server.tool()
def echo(message: str) -> str:
    """Echo the message back."""
    return f"echo: {message}"


if __name__ == "__main__":
    port = int(sys.argv[1])
    server.run(
        "streamable-http", host="127.0.0.1", port=port, event_store=MemoryEventStore(), retry_interval=200
    )
