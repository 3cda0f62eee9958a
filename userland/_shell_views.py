"""What the llmos shell draws with rich: the tables of ps, jobs, ls -l, devices,
sysinfo and models, and top's screen. Pure functions of syscall results; the
shell (userland/shell.py) prints them. Every cell is a Text, never markup, so
that a "[####....]" in a job's progress or a name with brackets shows as it is.
"""
from __future__ import annotations

import stat as statmod
import time
from typing import Any, Iterable, Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from userland._cli_models import progress
from userland.cli import _bytes, _clock, _duration, _printable, _resources


def text(value: Any, style: str = "") -> Text:
    return Text("-" if value is None else str(value), style=style)


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None,
          right: str = "", cut: str = "", fold: str = "", empty: str | None = None
          ) -> Table | Text:
    """A table with a header line and no borders. right: the columns (by name) aligned
    right; cut: those cut with an ellipsis to fit the width (one line per row); fold:
    those folded onto more lines to fit. The others keep their width. empty: the
    text shown instead of a table without rows."""
    rows = list(rows)
    if not rows and empty is not None:  # "allocations: none" rather than a bare header
        return Text(empty, style="bold")
    right_, cut_, fold_ = right.split(","), cut.split(","), fold.split(",")
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=title,
              title_justify="left", title_style="bold", header_style="bold")
    for c in columns:
        t.add_column(c, justify="right" if c in right_ else "left",
                     no_wrap=c not in cut_ and c not in fold_, overflow="fold")
    for row in rows:
        cells = []
        for c, cell in zip(columns, row):
            cell = cell if isinstance(cell, Text) else text(cell)
            if c in cut_:  # shrinks with the table, but stays on one line
                cell.no_wrap, cell.overflow = True, "ellipsis"
            cells.append(cell)
        t.add_row(*cells)
    return t


# -- processes ---------------------------------------------------------------------

def command_line(p: dict[str, Any]) -> str:
    return " ".join(map(_printable, p["argv"])) or "?"


def ps_table(procs: list[dict[str, Any]], me: int | None = None,
             title: str | None = None) -> Table:
    procs = sorted(procs, key=lambda p: p["pid"])
    now = time.time()
    info = any(p.get("info") for p in procs)
    cols = ["PID", "PPID", "UID", "STATE", "TIME", "RESOURCES", "COMMAND"]
    if info:
        cols.append("INFO")
    rows = []
    for p in procs:
        style = "bold" if p["pid"] == me else ("dim" if p["state"] != "running" else "")
        row = [text(p["pid"], style), p["ppid"], p["uid"], p["state"],
               _clock(now - p["start_time"]), _resources(p["resources"]),
               text(command_line(p), style)]
        if info:
            row.append(progress(p["info"]) if p.get("info") else "")
        rows.append(row)
    return table(cols, rows, title, right="PID,PPID,UID,TIME", cut="COMMAND,INFO")


def jobs_table(procs: list[dict[str, Any]]) -> Table:
    now = time.time()
    rows = [[p["pid"], p["ppid"], _clock(now - p["start_time"]),
             " ".join(p["argv"][-1:]), progress(p["info"])]
            for p in sorted(procs, key=lambda p: p["pid"]) if p.get("info")]
    return table(["PID", "PPID", "TIME", "NAME", "PROGRESS"], rows,
                 right="PID,PPID,TIME", cut="NAME,PROGRESS")


def wait_line(record: dict[str, Any]) -> str:
    status = record["status"]
    what = {"exited": f"exited with status {status}",
            "killed": f"killed by signal {-status}" if isinstance(status, int) and status < 0
            else f"killed (status {status})",
            "lost": "lost"}.get(record["reason"], f"{record['reason']} ({status})")
    line = f"pid {record['pid']} {what}"
    if record.get("info"):
        line += f"  {progress(record['info'])}"
    return line


# -- tensors -----------------------------------------------------------------------

def size(n: int) -> str:
    return _bytes(n)


def mode_string(entry: dict[str, Any]) -> str:
    kind = statmod.S_IFDIR if entry["type"] == "dir" else statmod.S_IFREG
    return statmod.filemode(kind | entry["mode"])


def when(t: float, seconds: bool = False) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M",
                         time.localtime(t))


def entry_name(e: dict[str, Any]) -> Text:
    name = e.get("name", e["path"])
    if e["type"] == "dir":
        return Text(name + "/", style="bold blue")
    return Text(name)


def ls_table(entries: list[dict[str, Any]]) -> Table:
    rows = []
    for e in entries:
        if "error" in e:  # a file listdir could not read (damaged, or not tensorfs's)
            rows.append(["?", "?", "?", "?", e["error"], "unreadable", entry_name(e)])
            continue
        tensor, group = e["type"] == "tensor", e["type"] == "group"
        rows.append([mode_string(e), e["owner"], size(e["size"]) if "size" in e else "-",
                     when(e["mtime"]), e.get("dtype", "") if tensor else
                     "group" if group else "",
                     str(e["shape"]) if tensor else
                     f"{e['n_members']} tensor{'' if e['n_members'] == 1 else 's'}"
                     if group else "", entry_name(e)])
    return table(["MODE", "OWNER", "SIZE", "MODIFIED", "DTYPE", "SHAPE", "NAME"], rows,
                 right="OWNER,SIZE", fold="SHAPE,NAME")


def stat_lines(st: dict[str, Any]) -> list[str]:
    lines = []
    for k in sorted(st):
        v = st[k]
        if k == "mode":
            v = f"{v:04o} ({mode_string(st)})"
        elif k in ("ctime", "mtime"):
            v = when(v, seconds=True)
        elif k == "size":
            v = f"{v} ({size(v)})"
        elif k == "members":  # a group: one line each, below
            continue
        lines.append(f"{k:9} {v}")
    for m in st.get("members", []):
        lines.append(f"  {m['name']}  {m['dtype']}{m['shape']}  {size(m['size'])}")
    return lines


# -- devices -----------------------------------------------------------------------

def gpu_tables(info: dict[str, Any], mine: Iterable[str] = ()) -> list[Table | Text]:
    """The GPUs, the allocations on them (the shell's own marked *) and the queue."""
    kind = "simulated" if info["simulated"] else "real"
    gpus = table(["#", "ID", "NAME", "CAPACITY", "ALLOCATED", "FREE", "EXCL", "UTIL%"],
                 [[g["index"], g["id"], g["name"], size(g["capacity"]), size(g["allocated"]),
                   size(g["free"]), "yes" if g["exclusive"] else "-",
                   "-" if g["simulated"] else g.get("utilization")]
                  for g in info["gpus"]],
                 title=f"gpus ({kind})", right="#,CAPACITY,ALLOCATED,FREE,UTIL%")
    mine = set(mine)
    allocs = table(["ID", "PID", "UID", "GPU", "BYTES", "EXCL"],
                   [[a["id"] + (" *" if a["id"] in mine else ""), a["pid"], a["uid"],
                     g["id"], size(a["bytes"]), "yes" if a["exclusive"] else "-"]
                    for g in info["gpus"] for a in g["allocations"]],
                   title="allocations (* this shell's)", right="PID,UID,BYTES",
                   empty="allocations: none")
    queue = table(["PID", "UID", "BYTES", "COUNT", "PRIORITY", "WAITED"],
                  [[w["pid"], w["uid"], size(w["mem"]), w["count"], w["priority"],
                    f"{w['waited_s']:.1f}s"] for w in info["queue"]],
                  title="waiting for GPUs", right="PID,UID,BYTES,COUNT,PRIORITY,WAITED",
                  empty="waiting for GPUs: none")
    return [gpus, allocs, queue]


def host_line(info: dict[str, Any]) -> str:
    cpus, mem = info["cpus"], info["memory"]
    load = " ".join(f"{x:.2f}" for x in cpus.get("load") or [])
    return (f"cpus {cpus['logical']} logical, {cpus.get('physical') or '-'} physical, "
            f"{cpus['percent']}% busy{', load ' + load if load else ''}; memory "
            f"{size(mem['total'])} total, {size(mem['available'])} available")


def devices_view(info: dict[str, Any], mine: Iterable[str] = ()) -> Group:
    return Group(Text(host_line(info)), *gpu_tables(info, mine))


# -- the kernel --------------------------------------------------------------------

def summary_lines(info: dict[str, Any]) -> list[str]:
    procs = info["processes"]
    return [f"kernel     pid {info['kernel_pid']} on {info['hostname']}, ABI {info['abi']}",
            f"home       {info['home']}",
            f"uptime     {_duration(info['uptime_s'])}",
            f"processes  {procs['total']} ({procs['running']} running, {procs['zombie']} "
            f"zombie), {info['waiting']} waiting"]


def drivers_table(info: dict[str, Any]) -> Table:
    rows = [[d["name"], d["state"], d["os_pid"], d["restarts"],
             _duration(d["uptime_s"]) if d["uptime_s"] is not None else "-",
             d["inflight"], d["backlog"], d["last_exit"] or "-"] for d in info["drivers"]]
    return table(["NAME", "STATE", "OS PID", "RESTARTS", "UPTIME", "IN FLIGHT", "BACKLOG",
                  "LAST EXIT"], rows, title="drivers",
                 right="OS PID,RESTARTS,UPTIME,IN FLIGHT,BACKLOG", cut="LAST EXIT")


def syscalls_table(info: dict[str, Any], rates: dict[str, float] | None = None,
                   limit: int | None = None) -> Table:
    items = sorted(info["syscalls"].items())
    if rates is not None:  # top: the busiest first
        items.sort(key=lambda kv: (-rates.get(kv[0], 0.0), -kv[1]["count"], kv[0]))
    if limit is not None:
        items = items[:limit]
    cols = ["NAME", "COUNT", "ERRORS", "P50 us", "P90 us", "P99 us"]
    if rates is not None:
        cols.insert(2, "PER S")
    rows = []
    for name, s in items:
        row = [name, s["count"], s["errors"], s["p50_us"], s["p90_us"], s["p99_us"]]
        if rates is not None:
            row.insert(2, f"{rates.get(name, 0.0):.1f}")
        rows.append(row)
    return table(cols, rows, title="syscalls",
                 right="COUNT,PER S,ERRORS,P50 us,P90 us,P99 us")


def sysinfo_view(info: dict[str, Any]) -> Group:
    dropped = sorted(info["dropped"].items())
    parts: list[RenderableType] = [Text("\n".join(summary_lines(info))), drivers_table(info),
                                   syscalls_table(info)]
    parts.append(table(["WHY", "COUNT"], dropped, title="dropped", right="COUNT",
                       empty="dropped: none"))
    return Group(*parts)


def models_view(m: dict[str, Any]) -> Group:
    rows = [[x["path"], size(x["bytes"]), x["step"], x["loss"], x["requests"]]
            for x in m["models"]]
    parts: list[RenderableType] = [
        table(["MODEL", "BYTES", "STEP", "LOSS", "REQUESTS"], rows, title="models loaded",
              right="BYTES,STEP,LOSS,REQUESTS", fold="MODEL",
              empty="models loaded: none")]
    e = m.get("engine") or {}
    if e:
        parts.append(Text(f"engine: {e.get('steps', 0)} steps, {e.get('tokens', 0)} tokens, "
                          f"mean batch {e.get('mean_batch', 0):.2f}, {e.get('running', 0)} "
                          f"running, {e.get('queued', 0)} queued"))
    return Group(*parts)


# -- top ---------------------------------------------------------------------------

class TopState:
    """What top remembers between refreshes: the syscall counts, for rates."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.at: float | None = None

    def rates(self, info: dict[str, Any]) -> dict[str, float]:
        now = time.monotonic()
        counts = {k: v["count"] for k, v in info["syscalls"].items()}
        rates = {}
        if self.at is not None and now > self.at:
            dt = now - self.at
            rates = {k: max(0, c - self.counts.get(k, 0)) / dt for k, c in counts.items()}
        self.counts, self.at = counts, now
        return rates


def top_view(state: TopState, procs: list[dict[str, Any]], devices: dict[str, Any] | None,
             info: dict[str, Any], me: int | None, mine: Iterable[str] = (),
             live: bool = False, height: int | None = None) -> Group:
    lines = [f"llmos top  {time.strftime('%H:%M:%S')}  up {_duration(info['uptime_s'])}  "
             f"processes {info['processes']['total']} ({info['processes']['running']} "
             f"running, {info['processes']['zombie']} zombie), {info['waiting']} waiting"]
    if devices is not None:
        lines.append(host_line(devices))
    parts: list[RenderableType] = [Text("\n".join(lines), style="bold")]
    parts.append(ps_table(procs, me, title="processes"))
    if devices is not None:
        parts.extend(gpu_tables(devices, mine))
    else:
        parts.append(Text("devices: the devices driver does not answer"))
    rows = None
    if height is not None:  # as many syscalls as fit under the rest
        used = 12 + len(procs) + 2 * len(devices["gpus"] if devices else []) + sum(
            len(g["allocations"]) for g in (devices or {}).get("gpus", [])) + len(
            (devices or {}).get("queue", []))
        rows = max(3, height - used)
    parts.append(syscalls_table(info, state.rates(info), limit=rows))
    if live:
        parts.append(Text("q or Ctrl-C leaves", style="dim"))
    return Group(*parts)
