"""A classroom in a box: one real `streamlit run app.py` server and N headless-Chromium sessions.

    python benchmarks/load.py --n 30 [--update-readme]
    python benchmarks/load.py --redraw-cost

Every session opens the home page on the offline preset; all click *Build cache* within one
second of each other, wait for the results, open *Neighbours*, upload an image, wait for its
gallery and move the θ slider. Recorded: time from the clicks to each session's results (and
to one session's alone, on a fresh data directory, as the yardstick), `/_stcore/health`
latency every 0.25 s throughout, the server's peak memory (its process and children), and any
exception or traceback shown in a page or written to the server log. Localhost only; every
wait is bounded. `tests/test_load.py` runs it with N = 8 (`python -m pytest -m load`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-dev-shm-usage"]
GOALS = {"slowdown": 1.5, "health_p95_s": 1.0}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/_stcore/health"


def start_server(data_dir: Path, port: int, log_path: Path, extra: list[str] = (), workers: int = 1
                 ) -> subprocess.Popen:
    env = dict(os.environ, CACHEVIZ_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1", CACHEVIZ_WORKERS=str(workers),
               CACHEVIZ_LOG_LEVEL="INFO")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", *extra],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    end = time.time() + 90
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(health_url(port), timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.25)
    stop_server(proc)
    raise TimeoutError("streamlit did not answer within 90 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _rss_mb(pids) -> float:
    """Resident memory of these processes together (MB), from /proc."""
    total = 0
    for p in pids:
        try:
            total += int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{p}/status").read_text()).group(1))
        except (OSError, AttributeError, ValueError):
            continue
    return total / 1024


def _cpu_of_stat(stat: str) -> float:
    """User + system CPU seconds from the text of /proc/<pid>/stat."""
    try:
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError):
        return 0.0


def _cpu_s(pid: int) -> float:
    try:
        return _cpu_of_stat(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return 0.0


def _cpu_times() -> tuple[int, int]:
    """(all, steal) jiffies of this machine so far, from /proc/stat: steal is the time the
    hypervisor gave this VM's CPUs to someone else."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(f[:8]), f[7]
    except (OSError, ValueError, IndexError):
        return 0, 0


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = [int(k) for k in (task / "children").read_text().split()]
                todo.extend(k for k in kids if k not in found)
                found.update(kids)
        except (OSError, ValueError):
            continue
    return found


def cpu_by_process(server_pid: int, kids: set[int]) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of the server, its descendants `kids` (the fork server and workers) and
    every browser process, per pid: the monitor keeps each pid's last value, so processes that
    have exited by the end still count."""
    out = {server_pid: ("server", _cpu_s(server_pid))}
    for pid in kids:
        out[pid] = ("workers", _cpu_s(pid))
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in out:
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1: stat.rfind(")")]
        if "chrom" in comm or "headless_shell" in comm:
            out[int(d.name)] = ("browsers", _cpu_of_stat(stat))
    return out


class Monitor(threading.Thread):
    """Probes the health endpoint every 0.25 s (5 s timeout) and samples the server's memory."""

    def __init__(self, port: int, pid: int):
        super().__init__(daemon=True)
        self.port, self.pid = port, pid
        self.latencies: list[float | None] = []
        self.rss_mb: list[float] = []
        self.stop = threading.Event()
        self.cpu0 = cpu_by_process(pid, _descendants(pid))  # before the run: subtracted
        self.cpu1 = dict(self.cpu0)

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(health_url(self.port), timeout=5) as r:
                    ok = r.status == 200
            except OSError:
                ok = False
            self.latencies.append(time.perf_counter() - t0 if ok else None)
            kids = _descendants(self.pid)  # one walk of the process tree for both samples
            self.rss_mb.append(_rss_mb({self.pid, *kids}))
            self.cpu1.update(cpu_by_process(self.pid, kids))
            self.stop.wait(max(0.0, 0.25 - (time.perf_counter() - t0)))

    def summary(self) -> dict:
        ok = sorted(x for x in self.latencies if x is not None)
        failed = sum(x is None for x in self.latencies)
        # a failed probe counts as slower than any answer
        ranked = ok + [float("inf")] * failed
        p95 = ranked[min(len(ranked) - 1, int(0.95 * len(ranked)))] if ranked else None
        cpu = dict.fromkeys(("server", "workers", "browsers"), 0.0)
        for pid, (kind, sec) in self.cpu1.items():
            cpu[kind] += sec - self.cpu0.get(pid, (kind, 0.0))[1]
        return {"cpu_s": {k: round(v, 1) for k, v in cpu.items()},
                "probes": len(self.latencies), "failed": failed, "p50_s": statistics.median(ok) if ok else None,
                "p95_s": p95, "max_s": ok[-1] if ok else None, "peak_rss_mb": max(self.rss_mb, default=0.0)}


def digit_png(path: Path) -> Path:
    import numpy as np
    from PIL import Image

    a = np.full((200, 160, 3), 250, np.uint8)
    a[30:50, 30:130] = 15
    for i in range(120):
        x = 125 - i * 60 // 120
        a[50 + i, x - 10: x + 10] = 15
    Image.fromarray(a).save(path)
    return path


async def _session(i: int, browser, url: str, barrier: asyncio.Barrier, png: Path, out: dict, timeout_ms: int):
    rec = out[i] = {"errors": []}
    # a browser profile of its own, as each student's is
    ctx = await browser.new_context(viewport={"width": 1280, "height": 1600}, reduced_motion="reduce")
    page = await ctx.new_page()
    page.on("pageerror", lambda e: rec["errors"].append(f"page error: {e}"))

    def frame(payload) -> None:
        # the moment the server's message with the results reaches the browser, before it is drawn
        data = payload if isinstance(payload, bytes) else str(payload).encode()
        if "click" in rec and "delivered" not in rec and b"Network alone" in data:
            rec["delivered"] = time.perf_counter()

    page.on("websocket", lambda ws: ws.on("framereceived", frame))
    try:
        await page.goto(url, timeout=timeout_ms)
        build = page.get_by_role("button", name="Build cache")
        await build.wait_for(timeout=timeout_ms)
        await barrier.wait()
        rec["click"], rec["click_wall"] = time.perf_counter(), time.time()
        await build.click(timeout=timeout_ms)
        await page.get_by_text("Network alone").wait_for(timeout=timeout_ms)
        rec["results"] = time.perf_counter()
        rec["step"] = "open Neighbours"
        await page.get_by_role("link", name="Neighbours").first.click(timeout=timeout_ms)
        await page.get_by_text("nearest stored images").wait_for(timeout=timeout_ms)
        rec["step"] = "upload"
        await page.get_by_text("Upload", exact=True).click(timeout=timeout_ms)
        await page.locator('input[type="file"]').set_input_files(str(png), timeout=timeout_ms)
        await page.get_by_text(f"{png.name} (160×200)").wait_for(timeout=timeout_ms)
        rec["step"] = "gallery of the upload"
        mass = page.get_by_text("of the similarity mass").first
        await mass.wait_for(timeout=timeout_ms)
        rec["gallery"] = time.perf_counter()
        rec["step"] = "θ slider"
        before = await mass.inner_text()
        slider = page.locator('[data-testid="stSlider"]', has_text="sharpness").get_by_role("slider")
        await slider.focus()
        for _ in range(6):
            await page.keyboard.press("ArrowRight")
        end = time.perf_counter() + timeout_ms / 1000
        while (await page.get_by_text("of the similarity mass").first.inner_text()) == before:
            if time.perf_counter() > end:
                raise TimeoutError("the θ slider did not change the gallery")
            await asyncio.sleep(0.2)
        rec["slider"] = time.perf_counter()
    except Exception as exc:  # recorded, not raised: the other sessions go on
        rec["errors"].append(f"{rec.get('step', 'build')}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        try:
            await page.screenshot(path=str(png.parent / f"failed-{i}.png"))
            rec["errors"].append(f"page text: {(await page.inner_text('body'))[-600:]!r}")
        except Exception:
            pass
    finally:
        try:
            shown = await page.locator('[data-testid="stException"]').count()
            if shown:
                rec["errors"].append(f"{shown} exception box(es) shown")
            if await page.get_by_text("Traceback").count():
                rec["errors"].append("a traceback was shown")
        except Exception:
            pass
        await ctx.close()


CGROUPS = (  # (folder, file, value): cgroup v1's cpu controller, or v2's
    (Path("/sys/fs/cgroup/cpu/cacheviz-load-browsers"), "cpu.shares", "2"),
    (Path("/sys/fs/cgroup/cacheviz-load-browsers"), "cpu.weight", "1"),
)


def confined_chromium(folder: Path) -> tuple[str, str | None]:
    """A Chromium launcher that puts the browsers into a CPU cgroup with the smallest share, where
    this machine allows it (root, a writable cgroup file system): the students' browsers stand
    in for machines of their own and must not take the server's two cores from it. Chromium sets
    its processes' nice values itself, so nice cannot do this. Returns (launcher, cgroup or None)."""
    for group, knob, value in CGROUPS:
        try:
            group.mkdir(exist_ok=True)
            (group / knob).write_text(value)
        except OSError:
            continue
        path = folder / "chromium-confined"
        path.write_text(f'#!/bin/sh\necho $$ > {group / "cgroup.procs"}\nexec {CHROMIUM} "$@"\n')
        path.chmod(0o755)
        return str(path), str(group)
    return CHROMIUM, None


async def _drive(n: int, url: str, png: Path, timeout_s: float, launcher: str) -> dict:
    from playwright.async_api import async_playwright

    out: dict[int, dict] = {}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=launcher, args=CHROMIUM_ARGS, headless=True)
        try:
            # the teacher opens the app first (the server starts its worker then), then the class
            ctx = await browser.new_context()
            page = await ctx.new_page()
            await page.goto(url, timeout=int(timeout_s * 1000))
            await page.get_by_role("button", name="Build cache").wait_for(timeout=int(timeout_s * 1000))
            await ctx.close()
            barrier = asyncio.Barrier(n)
            await asyncio.wait_for(
                asyncio.gather(*(_session(i, browser, url, barrier, png, out, int(timeout_s * 1000))
                                 for i in range(n))),
                timeout=timeout_s * 3)
        finally:
            await browser.close()
    return out


def run_load(n: int, data_dir: Path | None = None, timeout_s: float = 300, server_args: list[str] = (),
             workers: int = 1, confine: bool = True) -> dict:
    """One server on a fresh data directory, N sessions; returns what was measured."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_dir = data_dir or tmp / "data"
        port = free_port()
        log_path = tmp / "streamlit.log"
        proc = start_server(data_dir, port, log_path, list(server_args), workers)
        mon = Monitor(port, proc.pid)
        jiffies0 = _cpu_times()
        try:
            mon.start()
            launcher, cgroup = confined_chromium(tmp) if confine else (CHROMIUM, None)
            sessions = asyncio.run(_drive(n, f"http://127.0.0.1:{port}/", digit_png(tmp / "seven.png"), timeout_s,
                                          launcher))
        finally:
            mon.stop.set()
            mon.join(10)
            jiffies1 = _cpu_times()
            stop_server(proc)
        log = log_path.read_text()
    total = jiffies1[0] - jiffies0[0]
    steal = (jiffies1[1] - jiffies0[1]) / total if total > 0 else None
    job = re.search(r"cacheviz-job-done \S+ .*? after ([0-9.]+) s", log)
    clicks = [s["click"] for s in sessions.values() if "click" in s]
    results = [s["results"] - min(clicks) for s in sessions.values() if "results" in s]
    own = [s["results"] - s["click"] for s in sessions.values() if "results" in s]
    delivered = [s["delivered"] - min(clicks) for s in sessions.values() if "delivered" in s]
    # the server's own record of handing each session its result (same clock as click_wall)
    walls = [s["click_wall"] for s in sessions.values() if "click_wall" in s]
    first: dict[str, float] = {}  # session id -> the first time after the clicks
    for t, sid in re.findall(r"cacheviz-delivered ([0-9.]+) (\S+) ", log):
        if walls and float(t) > min(walls):
            first.setdefault(sid, float(t) - min(walls))
    sent = sorted(first.values())
    errors = [e for s in sessions.values() for e in s["errors"]]
    if "Traceback" in log:
        errors.append("a traceback in the server log")
    return {
        "n": n, "with_results": len(results), "click_spread_s": (max(clicks) - min(clicks)) if clicks else None,
        "last_results_s": max(results) if len(results) == n else None,
        "last_delivered_s": max(delivered) if len(delivered) == n else None,
        "last_sent_s": sent[-1] if len(sent) == n else None,
        "median_results_s": statistics.median(own) if own else None,
        "galleries": sum("gallery" in s for s in sessions.values()),
        "sliders": sum("slider" in s for s in sessions.values()),
        "health": mon.summary(), "errors": errors, "browser_cgroup": cgroup, "steal": steal,
        "job_s": float(job.group(1)) if job else None,
        "server_log_tail": log[-2000:] if errors else "",
    }


def measure(n: int, timeout_s: float = 300, server_args: list[str] = (), workers: int = 1,
            confine: bool = True, repeats: int = 2) -> dict:
    """One session alone (the yardstick), then N at once, each on a fresh server and data
    directory; `repeats` times, alternating. The slowdown is the best crowd over the best alone:
    a shared machine's noise (another VM's load, steal) only ever adds time, so the fastest of
    each is the least disturbed estimate of what this code costs; every run is kept and shown."""
    runs = []
    for _ in range(repeats):
        alone = run_load(1, timeout_s=timeout_s, server_args=server_args, workers=workers, confine=confine)
        crowd = run_load(n, timeout_s=timeout_s, server_args=server_args, workers=workers, confine=confine)
        runs.append({"alone": alone, "crowd": crowd})

    def best(kind: str, field: str = "last_results_s") -> dict:
        done = [r[kind] for r in runs if r[kind][field]]
        return min(done, key=lambda r: r[field]) if done else runs[-1][kind]

    alone, crowd = best("alone"), best("crowd")

    def ratio(field: str) -> float | None:
        a, c = best("alone", field)[field], best("crowd", field)[field]
        return c / a if a and c else None

    complete = all(r["crowd"]["last_results_s"] for r in runs)
    return {"alone": alone, "crowd": crowd, "runs": runs, "slowdown": ratio("last_results_s") if complete else None,
            "slowdown_sent": ratio("last_sent_s"), "goals": GOALS, "workers": workers, "repeats": repeats,
            "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count()}


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def table(res: dict) -> str:
    a, c, h = res["alone"], res["crowd"], res["crowd"]["health"]
    fmt = lambda x, unit="s": "—" if x is None else (f"{x:.2f} {unit}" if x != float("inf") else "no answer")  # noqa: E731
    return "\n".join([
        "| classroom load | measured | goal |",
        "|---|---|---|",
        f"| sessions with results | {c['with_results']} of {c['n']} (clicks within {fmt(c['click_spread_s'])}) "
        f"| all |",
        f"| clicks to the last session's results | {fmt(c['last_results_s'])} against {fmt(a['last_results_s'])} "
        f"for one session alone: {res['slowdown']:.2f}x | <= {GOALS['slowdown']}x |" if res["slowdown"] else
        "| clicks to the last session's results | not all sessions got results | |",
        (f"| clicks to the server handing the last session its results | {fmt(c['last_sent_s'])} against "
         f"{fmt(a['last_sent_s'])} alone: {res['slowdown_sent']:.2f}x | |" if res.get("slowdown_sent") else
         "| clicks to the server handing the last session its results | not measured | |"),
        f"| `/_stcore/health` during the run | p50 {fmt(h['p50_s'])}, p95 {fmt(h['p95_s'])}, max {fmt(h['max_s'])}, "
        f"{h['failed']} of {h['probes']} probes unanswered in 5 s | p95 <= {GOALS['health_p95_s']:.0f} s |",
        f"| galleries of the upload, θ slider moved | {c['galleries']} and {c['sliders']} of {c['n']} | all |",
        f"| server memory (process and children), peak | {h['peak_rss_mb']:.0f} MB | bounded |",
        f"| exceptions or tracebacks shown | {len(c['errors'])} | 0 |",
        "| every run: clicks to the last results, crowd / alone (the build itself; steal) | " + "; ".join(
            f"{fmt(r['crowd']['last_results_s'])} / {fmt(r['alone']['last_results_s'])} "
            f"({fmt(r['crowd']['job_s'])} / {fmt(r['alone']['job_s'])}; "
            f"{_pct(r['crowd']['steal'])} / {_pct(r['alone']['steal'])})" for r in res.get("runs", ())) + " | |",
        "| CPU seconds of the crowd's best run: server, worker, browsers | "
        f"{h['cpu_s']['server']}, {h['cpu_s']['workers']}, {h['cpu_s']['browsers']} | |",
        f"| where the {c['n']} browsers ran | " + (
            f"this machine, in a CPU cgroup of the smallest share (`{c['browser_cgroup']}`), standing in for "
            "the students' own machines" if c.get("browser_cgroup") else
            "this machine, sharing its cores with the server at full share") + " | |",
    ])


def _browser_cpu_s() -> float:
    return sum(sec for kind, sec in cpu_by_process(os.getpid(), set()).values() if kind == "browsers")


async def _redraw_probe(url: str, window_s: float) -> dict:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            ctx = await browser.new_context(viewport={"width": 1280, "height": 1600}, reduced_motion="reduce")
            page = await ctx.new_page()
            frames = []
            page.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append(time.perf_counter())))
            await page.goto(url)
            build = page.get_by_role("button", name="Build cache")
            await build.wait_for()
            await asyncio.sleep(2)  # the first render settles
            c0, t0 = _browser_cpu_s(), time.perf_counter()
            await asyncio.sleep(window_s)
            idle = (_browser_cpu_s() - c0) / (time.perf_counter() - t0)
            await build.click()
            await asyncio.sleep(1.5)  # the click's own rerun is not a progress redraw
            c0, t0 = _browser_cpu_s(), time.perf_counter()
            await asyncio.sleep(window_s)
            busy_s, t1 = _browser_cpu_s() - c0, time.perf_counter()
            redraws = sum(t0 <= t <= t1 for t in frames)
        finally:
            await browser.close()
    watching = busy_s / (t1 - t0)
    return {"idle_cores": idle, "watching_cores": watching, "redraws": redraws, "window_s": t1 - t0,
            "cpu_per_redraw_s": (watching - idle) * (t1 - t0) / redraws if redraws else None}


def redraw_cost(window_s: float = 5.0) -> dict:
    """What one watching browser spends on the build's progress: headless Chromium's CPU (its
    processes, from /proc) on the idle home page, then while it watches a build (the digits
    CNN's first-use training), and per websocket message received in that window."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        port = free_port()
        proc = start_server(tmp / "data", port, tmp / "streamlit.log")
        try:
            return asyncio.run(_redraw_probe(f"http://127.0.0.1:{port}/", window_s))
        finally:
            stop_server(proc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--timeout", type=float, default=300, help="seconds any one wait may take")
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `streamlit run` option (repeatable)")
    ap.add_argument("--workers", type=int, default=1, help="CACHEVIZ_WORKERS for the server (0: threads)")
    ap.add_argument("--repeats", type=int, default=2, help="alone + crowd pairs; the best of each is compared")
    ap.add_argument("--share-cores", action="store_true",
                    help="leave the browsers on the server's cores at full share (no CPU cgroup)")
    ap.add_argument("--redraw-cost", action="store_true",
                    help="instead: one browser's CPU on the idle page and while it watches a build, per redraw")
    args = ap.parse_args(argv)
    if args.redraw_cost:
        r = redraw_cost()
        print(f"one headless Chromium: {r['idle_cores']:.3f} cores on the idle page, {r['watching_cores']:.3f} while "
              f"watching a build ({r['redraws']} progress messages in {r['window_s']:.1f} s): "
              + (f"{1000 * r['cpu_per_redraw_s']:.0f} ms of CPU per message" if r["cpu_per_redraw_s"] else "no messages"))
        return 0
    res = measure(args.n, args.timeout, args.server_arg, args.workers, confine=not args.share_cores,
                  repeats=args.repeats)
    out = REPO / "benchmarks" / "results" / f"load-{args.n}{'-shared-cores' if args.share_cores else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    md = table(res)
    print(md)
    for e in [e for r in res["runs"] for e in r["crowd"]["errors"] + r["alone"]["errors"]][:10]:
        print("error:", e)
    if args.update_readme:
        readme = REPO / "README.md"
        text = readme.read_text()
        start, end = "<!-- load:start -->", "<!-- load:end -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            readme.write_text(f"{head}{start}\n{md}\n{end}{rest.split(end, 1)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
