"""How results look: plain-text tables and the words and numbers in them.

Pure functions from syscall results to lines of text, the same for `llmos VERB`
and the shell's VERB (the command table, _command.py, prints them). Nothing here
makes a syscall or imports anything heavier than the standard library: every
command loads this module.
"""
from __future__ import annotations

import os
import stat as statmod
import time
from typing import Any, Iterable, Sequence

from syscalls import format_size


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "",
          empty: str | None = None) -> list[str]:
    """Rows as aligned text under a header line; align has a letter per column, l or
    r (default l). empty: the line shown instead of a table without rows."""
    rows = [[_cell(c) for c in row] for row in rows]
    if not rows and empty is not None:
        return [empty]
    cells = [list(map(str, headers)), *rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    align = align.ljust(len(headers), "l")
    return ["  ".join(c.rjust(w) if a == "r" else c.ljust(w)
                      for c, w, a in zip(row, widths, align)).rstrip() for row in cells]


def _cell(value: Any) -> str:
    return "-" if value is None else printable(str(value))


def indented(lines: Iterable[str], by: str = "  ") -> list[str]:
    return [by + line for line in lines]


def size(n: int | None) -> str:
    """1536 -> 1.5KiB, as ls -h writes it; "-" for None."""
    return "-" if n is None else format_size(n).replace(" ", "")


def duration(seconds: float) -> str:
    """12.3s, 4m 05s, 3h 04m, 2d 03h."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def clock(seconds: float) -> str:
    """Elapsed time as ps shows it: MM:SS, HH:MM:SS, D-HH:MM:SS."""
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}-{hours:02d}:{minutes:02d}:{s:02d}"
    if hours:
        return f"{hours:02d}:{minutes:02d}:{s:02d}"
    return f"{minutes:02d}:{s:02d}"


def when(t: float, seconds: bool = False) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M",
                         time.localtime(t))


def printable(text: str) -> str:
    """text on one line: a newline, tab or other control character as its escape
    (\\n, \\t, \\x1b), so that what a process published cannot draw on a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


# -- processes ------------------------------------------------------------------------

PYTHONS = ("python", "python3")


def command_line(p: dict[str, Any], full: bool = False) -> str:
    """What ps shows of a process's argv: the program's name and its arguments, a
    Python program by its script or module (`llmos ps`, `train.py -n 3`, `python
    -m drivers.executor.train --job demo`); a system process in brackets, as
    Linux shows kernel threads. full: the argv as it is."""
    argv = [str(a) for a in p.get("argv") or []]
    if not argv:
        return "?"
    if not full:
        argv = _short_argv(argv)
    text = " ".join(printable(a) for a in argv)
    return f"[{text}]" if p.get("system") else text


def _short_argv(argv: list[str]) -> list[str]:
    name = os.path.basename(argv[0])
    if name.rstrip("0123456789.").endswith(PYTHONS) and len(argv) > 1 \
            and not argv[1].startswith("-"):
        return [os.path.basename(argv[1]), *argv[2:]]  # the script, not the interpreter
    if name.rstrip("0123456789.") in PYTHONS:
        name = "python"
    return [name, *argv[1:]]


def resources(held: dict[str, list[str]]) -> str:
    return ",".join(f"{kind}:{len(names)}" for kind, names in sorted(held.items())) or "-"


def state(p: dict[str, Any]) -> str:
    """running, zombie, or how an ended process ended (exited 0, killed 9, lost)."""
    if p["state"] == "running":
        return "running"
    status, reason = p.get("status"), p.get("reason")
    if reason == "exited":
        what = f"exited {status}"
    elif reason == "killed" and isinstance(status, int) and status < 0:
        what = f"killed {-status}"
    else:
        what = str(reason or "?")
    return f"zombie ({what})" if p["state"] == "zombie" else what


def progress(info: dict[str, Any]) -> str:
    """A job's report on one line: running  step 120/300 [#####.....]  loss 2.41
    (from 5.55)  9,874 tok/s."""
    step, steps = info.get("step", 0), info.get("steps") or 0
    parts = [str(info.get("state", "?"))]
    if steps and isinstance(step, (int, float)):
        done = min(1.0, step / steps)
        bar = "#" * int(done * 20) + "." * (20 - int(done * 20))
        parts.append(f"step {step}/{steps} [{bar}]")
    if isinstance(info.get("loss"), (int, float)):
        loss = f"loss {info['loss']:.3f}"
        if isinstance(info.get("loss0"), (int, float)):
            loss += f" (from {info['loss0']:.3f})"
        parts.append(loss)
    if isinstance(info.get("tokens_per_s"), (int, float)):
        parts.append(f"{info['tokens_per_s']:,.0f} tok/s")
    if isinstance(info.get("perplexity"), (int, float)):
        parts.append(f"perplexity {info['perplexity']:.3f}")
    if info.get("error"):
        parts.append(f"error: {info['error']}")
    return printable("  ".join(parts))


def ps_lines(procs: list[dict[str, Any]], full: bool = False) -> list[str]:
    now = time.time()
    procs = sorted(procs, key=lambda p: p["pid"])
    rows = []
    for p in procs:
        end = p.get("end_time") or now
        rows.append([p["pid"], p["ppid"], p["uid"], state(p), clock(end - p["start_time"]),
                     resources(p.get("resources") or {}), command_line(p, full)])
    headers = ["PID", "PPID", "UID", "STATE", "TIME", "RESOURCES", "COMMAND"]
    align = "rrrlrll"
    if len({p.get("node") for p in procs}) > 1:  # more than one node: say where
        headers.insert(3, "NODE")
        align = "rrrl" + align[3:]
        for row, p in zip(rows, procs):
            row.insert(3, p.get("node"))
    if any(p.get("info") for p in procs):  # what report() published: a job's progress
        headers.append("INFO")
        for row, p in zip(rows, procs):
            row.append(progress(p["info"]) if p.get("info") else "")
    return table(headers, rows, align)


def nodes_lines(nodes: list[dict[str, Any]]) -> list[str]:
    rows = []
    for n in nodes:
        gpus = n.get("gpus")
        age = n.get("heartbeat_age_s")
        rows.append([n["name"] + (" (head)" if n.get("head") else ""), n["state"],
                     n.get("epoch"), "-" if age is None else f"{age:.1f}s", n.get("host"),
                     n.get("cpus"), size(n.get("memory")),
                     "see devices" if gpus is None else len(gpus), n.get("processes")])
    return table(["NODE", "STATE", "EPOCH", "HEARTBEAT", "HOST", "CPUS", "MEMORY", "GPUS",
                  "PROCS"], rows, "llrrlrrrr")


def jobs_lines(procs: list[dict[str, Any]]) -> list[str]:
    now = time.time()
    rows = [[p["pid"], state(p), clock((p.get("end_time") or now) - p["start_time"]),
             job_name(p), progress(p["info"]), p["info"].get("checkpoint")]
            for p in sorted(procs, key=lambda p: p["pid"])]
    return table(["PID", "STATE", "TIME", "NAME", "PROGRESS", "CHECKPOINT"], rows,
                 "rlrl", empty="no jobs")


def job_name(p: dict[str, Any]) -> str:
    """A training job's name (its --job argument), else its short command line."""
    argv = p.get("argv") or []
    if "--job" in argv and argv.index("--job") + 1 < len(argv):
        return argv[argv.index("--job") + 1]
    return command_line(p)


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


# -- tensors --------------------------------------------------------------------------

def mode_string(entry: dict[str, Any]) -> str:
    kind = statmod.S_IFDIR if entry["type"] == "dir" else statmod.S_IFREG
    return statmod.filemode(kind | entry["mode"])


def entry_name(e: dict[str, Any]) -> str:
    name = printable(e.get("name", e["path"]))
    return name + "/" if e["type"] == "dir" else name


def _what(e: dict[str, Any]) -> str:
    if e["type"] == "tensor" or e["type"] == "member":
        return f"{e['dtype']}{e['shape']}"
    if e["type"] == "group":
        n = e["n_members"] if "n_members" in e else len(e.get("members", []))
        return f"{n} tensor{'' if n == 1 else 's'}"
    return ""


def ls_lines(entries: list[dict[str, Any]], long: bool) -> list[str]:
    if not long:
        return [entry_name(e) for e in entries]
    rows = []
    for e in entries:
        if "error" in e:  # a file listdir could not read (damaged, or not tensorfs's)
            rows.append(["?" * 10, "?", "?", "?", f"({e['error']}: unreadable)",
                         entry_name(e)])
            continue
        rows.append([mode_string(e), e["owner"], size(e.get("size")), when(e["mtime"]),
                     _what(e), entry_name(e)])
    return table(["MODE", "OWNER", "SIZE", "MODIFIED", "WHAT", "NAME"], rows, "lrrl")


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
            v = _what(st)
        elif k == "compression":  # a compressed model's manifest: its lines, below
            continue
        lines.append(f"{k:9} {printable(str(v))}")
    for m in st.get("members", []):
        lines.append(f"  {printable(m['name'])}  {m['dtype']}{m['shape']}  {size(m['size'])}")
    if st.get("compression"):
        lines += manifest_lines(st["compression"])
    return lines


# -- devices and the kernel -------------------------------------------------------------

def host_line(info: dict[str, Any]) -> str:
    cpus, mem = info["cpus"], info["memory"]
    load = " ".join(f"{x:.2f}" for x in cpus.get("load") or [])
    return (f"cpus {cpus['logical']} logical, {cpus.get('physical') or '-'} physical, "
            f"{cpus['percent']}% busy{', load ' + load if load else ''}; memory "
            f"{size(mem['total'])} total, {size(mem['available'])} available")


def devices_lines(info: dict[str, Any], mine: Iterable[str] = ()) -> list[str]:
    mine = set(mine)
    kind = "simulated" if info["simulated"] else "real"
    lines = [host_line(info), "", f"gpus ({kind})"]
    lines += indented(table(
        ["#", "ID", "NAME", "CAPACITY", "ALLOCATED", "FREE", "EXCL", "UTIL%"],
        [[g["index"], g["id"], g["name"], size(g["capacity"]), size(g["allocated"]),
          size(g["free"]), "yes" if g["exclusive"] else "-",
          "-" if g["simulated"] else g.get("utilization")] for g in info["gpus"]],
        "rllrrrlr", empty="(none)"))
    lines += ["", "allocations" + (" (* this session's)" if mine else "")]
    lines += indented(table(
        ["ID", "PID", "UID", "GPU", "BYTES", "EXCL"],
        [[a["id"] + (" *" if a["id"] in mine else ""), a["pid"], a["uid"], g["id"],
          size(a["bytes"]), "yes" if a["exclusive"] else "-"]
         for g in info["gpus"] for a in g["allocations"]], "lrrlrl", empty="(none)"))
    lines += ["", "waiting"]
    lines += indented(table(
        ["PID", "UID", "BYTES", "COUNT", "PRIORITY", "WAITED"],
        [[w["pid"], w["uid"], size(w["mem"]), w["count"], w["priority"],
          f"{w['waited_s']:.1f}s"] for w in info["queue"]], "rrrrrr", empty="(none)"))
    return lines


def summary_lines(info: dict[str, Any]) -> list[str]:
    procs = info["processes"]
    return [f"kernel     pid {info['kernel_pid']} on {info['hostname']}, ABI {info['abi']}",
            f"home       {info['home']}",
            f"uptime     {duration(info['uptime_s'])}",
            f"processes  {procs['total']} ({procs['running']} running, {procs['zombie']} "
            f"zombie), {info['waiting']} waiting"]


def drivers_lines(info: dict[str, Any]) -> list[str]:
    return table(["NAME", "STATE", "OS PID", "RESTARTS", "UPTIME", "IN FLIGHT", "BACKLOG",
                  "LAST EXIT"],
                 [[d["name"], d["state"], d["os_pid"], d["restarts"],
                   duration(d["uptime_s"]) if d["uptime_s"] is not None else None,
                   d["inflight"], d["backlog"], d["last_exit"] or None]
                  for d in info["drivers"]], "llrrrrrl")


def syscalls_lines(info: dict[str, Any], rates: dict[str, float] | None = None,
                   limit: int | None = None) -> list[str]:
    items = sorted(info["syscalls"].items())
    if rates is not None:  # top: the busiest first
        items.sort(key=lambda kv: (-rates.get(kv[0], 0.0), -kv[1]["count"], kv[0]))
    rows = []
    for name, s in items[:limit]:
        row = [name, s["count"], s["errors"], s["p50_us"], s["p90_us"], s["p99_us"]]
        if rates is not None:
            row.insert(2, f"{rates.get(name, 0.0):.1f}")
        rows.append(row)
    headers = ["NAME", "COUNT", "ERRORS", "P50 us", "P90 us", "P99 us"]
    if rates is not None:
        headers.insert(2, "PER S")
    return table(headers, rows, "lrrrrrr")


def sysinfo_lines(info: dict[str, Any]) -> list[str]:
    dropped = sorted(info["dropped"].items())
    return [*summary_lines(info), "", "drivers", *indented(drivers_lines(info)), "",
            "syscalls", *indented(syscalls_lines(info)), "", "dropped",
            *indented(table(["WHY", "COUNT"], dropped, "lr", empty="(none)"))]


def models_lines(m: dict[str, Any]) -> list[str]:
    rows = [[x["path"], size(x["bytes"]), x["step"],
             f"{x['loss']:.3f}" if isinstance(x["loss"], (int, float)) else None,
             x["requests"], compression_summary(x.get("compression"))]
            for x in m["models"]]
    lines = table(["MODEL", "BYTES", "STEP", "LOSS", "REQUESTS", "COMPRESSION"], rows,
                  "lrrrrl", empty="no models loaded")
    e = m.get("engine") or {}
    if e:
        lines.append(f"engine: {e.get('steps', 0)} steps, {e.get('tokens', 0)} tokens, "
                     f"mean batch {e.get('mean_batch', 0):.2f}, {e.get('running', 0)} "
                     f"running, {e.get('queued', 0)} queued")
    return lines


def _ratio(pair: Any, fmt: str = "{:.2f}x") -> str | None:
    if isinstance(pair, dict) and isinstance(pair.get("ratio"), (int, float)):
        return fmt.format(pair["ratio"])
    return None


def compression_summary(m: dict[str, Any] | None) -> str:
    """A compressed model's manifest on one line: method, bytes, perplexity, speed."""
    if not m:
        return ""
    if m.get("exported"):  # a float copy of an int8 model: its figures are not this one's
        return printable(f"float32, exported from {m.get('method')} of {m.get('source')}")
    parts = [str(m.get("method", "?"))]
    b = m.get("bytes") or {}
    if isinstance(b.get("ratio"), (int, float)):
        parts.append(f"{b['ratio']:.2f}x smaller")
    ppl = m.get("perplexity") or {}
    if isinstance(ppl.get("ratio"), (int, float)):
        parts.append(f"ppl {100 * (ppl['ratio'] - 1):+.1f}%")
    speed = (m.get("tokens_per_s") or {}).get("batch1")
    if _ratio(speed):
        parts.append(f"decode {_ratio(speed)}")
    return printable(", ".join(parts))


def manifest_lines(m: dict[str, Any]) -> list[str]:
    """A compressed model's manifest (compression.json), as stat and quantize show it."""
    lines = [f"compression: {m.get('method')} of {m.get('source_checkpoint') or m.get('source')}"]
    if m.get("exported"):
        lines.append(f"  this copy: {m['exported']}; the figures below are the "
                     f"{m.get('method')} model's")
    settings = {k: v for k, v in (m.get("settings") or {}).items() if k != "method"}
    if settings:
        lines.append("  settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    b = m.get("bytes") or {}
    if b:
        lines.append(f"  bytes: {size(b.get('before', 0))} -> {size(b.get('after', 0))} "
                     f"({_ratio(b) or '?'} smaller)")
    lb = m.get("layer_bytes")
    if lb:
        lines.append(f"  quantized layers: {size(lb['before'])} -> {size(lb['after'])} "
                     f"({_ratio(lb)} smaller)")
    ppl = m.get("perplexity") or {}
    if "before" in ppl:
        lines.append(f"  perplexity: {ppl['before']:.3f} -> {ppl['after']:.3f} "
                     f"({100 * (ppl['ratio'] - 1):+.2f}%) on {ppl.get('tokens')} held-out "
                     f"tokens of {ppl.get('data')}")
    elif ppl.get("why"):
        lines.append(f"  perplexity: {ppl['why']}")
    for batch, pair in (m.get("tokens_per_s") or {}).items():
        if isinstance(pair, dict) and "before" in pair:
            lines.append(f"  decode {batch}: {pair['before']:,.0f} -> {pair['after']:,.0f} "
                         f"tok/s ({_ratio(pair)})")
    if m.get("shape"):
        lines.append("  shape: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in
                                             m["shape"].items()))
    if m.get("pruned"):
        p = m["pruned"]
        lines.append(f"  zeros: {p.get('sparsity', 0):.1%} of {p.get('weights', 0):,} weights")
    if m.get("finetune"):
        f = m["finetune"]
        lines.append(f"  fine-tune: {f['steps']} steps, loss {f['loss0']:.3f} -> "
                     f"{f['loss']:.3f}; perplexity before it "
                     f"{m.get('perplexity_before_finetune') or 0:.3f}")
    lines.append(f"  speed: {m.get('speed')}")
    took = m.get("time_s")
    on = m.get("measured_on") or {}
    lines.append(f"  measured on: {on.get('cpus')} CPUs, torch {on.get('torch')}, "
                 f"{on.get('torch_threads')} threads; took {took}s")
    return [printable(line) for line in lines]


def eval_line(info: dict[str, Any]) -> str:
    """eval's result on one line."""
    parts = []
    if isinstance(info.get("perplexity"), (int, float)):
        parts.append(f"perplexity {info['perplexity']:.3f} on {info.get('eval_tokens')} "
                     f"held-out tokens of {info.get('data')}")
    for b in (1, 8):
        rate = info.get(f"tokens_per_s_b{b}")
        if isinstance(rate, (int, float)):
            parts.append(f"decode {rate:,.0f} tok/s at batch {b}")
    if isinstance(info.get("bytes"), int):
        parts.append(f"weights {size(info['bytes'])}")
    return printable(f"{info.get('model')}: " + ", ".join(parts))
