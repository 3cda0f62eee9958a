"""serve's status page (GET /): processes, GPUs, models, deployments and request
rates, in one HTML page with no external assets (it refreshes itself every 5 s)."""
from __future__ import annotations

import html
from typing import Any

from syscalls import SyscallError, format_size

STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;
padding:.25em .6em;text-align:left}th{background:#f0f0f0}h1{font-size:1.4em}
h2{font-size:1.1em;margin-bottom:.3em}.muted{color:#777}"""


def _table(title: str, cols: list[str], rows: list[list[Any]], tid: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>"
                   for r in rows) or f'<tr><td colspan="{len(cols)}" class="muted">none</td></tr>'
    return f'<h2>{html.escape(title)}</h2><table id="{tid}"><tr>{head}</tr>{body}</table>'


async def render(gw: Any, rate: float = 0.0) -> str:
    def read(osh: Any) -> tuple:
        procs = osh.ps()
        try:
            devices = osh.devices()
        except SyscallError:
            devices = {"gpus": [], "queue": []}
        try:
            models = osh.models()
        except SyscallError:
            models = {"models": []}
        return procs, devices, models
    procs, devices, models = await gw.admin_call(read)
    deps = [d.record() for d in gw.deployments.values()]
    parts = [f"<h1>llmos serve</h1><p>{html.escape(gw.url)} &middot; "
             f"{rate:.2f} requests/s over the last minute &middot; "
             f"{len(procs)} processes</p>"]
    parts.append(_table("Deployments", ["name", "model", "replicas (running/desired)",
                                        "min..max", "ongoing", "queued", "requests", "429s",
                                        "error"],
                        [[d["name"], d["model"], f"{d['running']}/{d['desired']}",
                          f"{d['min']}..{d['max']}", d["ongoing"], d["queued"],
                          d["requests"], d["rejected"], d["error"] or ""] for d in deps],
                        "deployments"))
    parts.append(_table("GPUs", ["id", "name", "allocated", "free", "allocations"],
                        [[g["id"], g.get("name", ""), format_size(g["allocated"]),
                          format_size(g["free"]), len(g["allocations"])]
                         for g in devices.get("gpus", [])], "gpus")
                 + f"<p>alloc_gpu queue: {len(devices.get('queue', []))}</p>")
    parts.append(_table("Loaded models (executor)", ["path", "architecture", "bytes",
                                                     "requests"],
                        [[m["path"], m.get("architecture", ""), format_size(m["bytes"]),
                          m["requests"]] for m in models.get("models", [])], "models"))
    parts.append(_table("Processes", ["pid", "ppid", "uid", "state", "command"],
                        [[p["pid"], p["ppid"], p["uid"], p["state"],
                          " ".join(p["argv"])[:80]] for p in procs], "processes"))
    return ("<!doctype html><html><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"refresh\" content=\"5\"><title>llmos serve</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
