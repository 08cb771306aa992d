"""Where the machine's CPU goes while the engine trains: each process's share of a core, and the
adapt workers' threads, from /proc over a window of a running job.

    PYTHONPATH=. python benchmarks/cpu_accounting.py [--workers 2] [--mode async] [--set prefetch=true]
                                                    [--config omniglot-5w1s] [--warmup 30] [--seconds 20]

It starts `reptile-dist train` itself (a local Ray cluster, one torch thread per worker, no periodic
evaluation and the before-training one on a single task, no checkpoints until the end, a metric row every 10 meta-steps) in a
temporary run directory, waits `--warmup` seconds, reads utime + stime of every process on the
machine and of each thread of the adapt workers, again after `--seconds`, prints the shares
(100% = one core busy for the whole window) and the tasks/s the run logged meanwhile, and stops
the job with SIGTERM. Everything else on the machine shows up too (run it alone). Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
WORKER_TITLE = "ray::AdaptWorker"  # an adapt worker's process title (ray::Class[.method])


def _stat(path: str) -> tuple[str, int] | None:
    """(name, utime + stime in ticks) from a /proc stat file; None when the process has gone."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return text[text.find("(") + 1:text.rfind(")")], int(fields[11]) + int(fields[12])


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def snapshot() -> tuple[dict, dict]:
    """Ticks per process of every process on the machine, and per thread (pid, tid) of the adapt workers."""
    processes, threads = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        got = _stat(f"/proc/{pid}/stat")
        if got is None:
            continue
        processes[pid] = (_cmdline(pid) or got[0], got[1])
        if not processes[pid][0].startswith(WORKER_TITLE):
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            thread = _stat(f"/proc/{pid}/task/{tid}/stat")
            if thread is not None:
                threads[(pid, tid)] = thread
    return processes, threads


def label(cmd: str) -> str:
    """A short name: an actor process by its class (its title is ray::Class[.method]); Ray's daemons by binary."""
    if cmd.startswith("ray::"):
        return cmd.split()[0].split(".")[0]  # the actor's class; its title names the method it runs now
    for daemon in ("gcs_server", "raylet", "log_monitor", "dashboard", "monitor.py"):
        if daemon in cmd:
            return daemon
    if "reptile_dist.cli" in cmd:
        return "driver (reptile-dist train)"
    return cmd[:60]


def tasks_logged(run: Path) -> list[tuple[float, float]]:
    """(wall_s, tasks applied) of each metric row the run has written."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line being written
            continue
        if "wall_s" in row and "step" in row:  # metric rows (not events)
            rows.append((row["wall_s"], row["step"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="omniglot-5w1s")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mode", default="async", choices=("sync", "async"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds after the start before the window")
    parser.add_argument("--seconds", type=float, default=20.0, help="the window")
    args = parser.parse_args()
    if not os.path.isdir("/proc/self/task"):
        sys.exit("cpu_accounting: needs Linux's /proc")
    fixed = ["torch_threads=1", "meta_iters=1000000000", "eval_every=0", "eval_tasks_periodic=1",
             "checkpoint_every=0", "log_every=10"]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        command = [sys.executable, "-m", "reptile_dist.cli", "train", "--config", args.config, "--backend", "ray",
                   "--workers", str(args.workers), "--mode", args.mode, "--out", str(run), "--no-progress"]
        for override in fixed + args.overrides:
            command += ["--set", override]
        log = open(Path(tmp) / "job.log", "w+")
        job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            try:  # a job that cannot start (a bad --set) ends here at once, not after the warm-up
                job.wait(timeout=args.warmup)
                log.seek(0)
                print(f"cpu_accounting: the job ended before the window:\n{log.read().strip()}", file=sys.stderr)
                sys.exit(job.returncode or 1)  # its own status: 2 for bad input
            except subprocess.TimeoutExpired:
                pass
            rows_before, t0 = tasks_logged(run), time.perf_counter()
            before, before_threads = snapshot()
            time.sleep(args.seconds)
            window = time.perf_counter() - t0
            after, after_threads = snapshot()
            rows_after = tasks_logged(run)
        finally:
            job.send_signal(signal.SIGTERM)  # the CLI stops as on Ctrl-C: Ray shut down, daemons gone
            try:
                job.wait(timeout=60)
            except subprocess.TimeoutExpired:
                job.kill()
                job.wait()
            log.close()
    share = {pid: (after[pid][1] - before.get(pid, ("", 0))[1]) / TICKS / window for pid in after}
    groups: dict[str, list[float]] = {}
    for pid, used in share.items():
        if used > 0.002:
            groups.setdefault(label(after[pid][0]), []).append(used)
    print(f"{args.config}, {args.mode}, W = {args.workers}, {' '.join(args.overrides) or 'no other settings'}: "
          f"CPU over {window:.1f} s (100% = one core)")
    for name, used in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        each = f" ({', '.join(f'{100 * u:.1f}%' for u in sorted(used, reverse=True))})" if len(used) > 1 else ""
        print(f"  {100 * sum(used):6.1f}%  {name}{each}")
    print(f"  {100 * sum(u for u in share.values() if u > 0.002):6.1f}%  in all")
    workers = [pid for pid in after if after[pid][0].startswith(WORKER_TITLE)]
    for pid in workers:
        used = {tid: ((ticks - before_threads.get((p, tid), ("", 0))[1]) / TICKS / window, name)
                for (p, tid), (name, ticks) in after_threads.items() if p == pid}
        busiest = max(used, key=lambda tid: used[tid][0])  # the thread running the actor's calls (adapting)
        parts = {}
        for tid, (share_of_core, name) in used.items():
            if tid != busiest:
                parts[name] = parts.get(name, 0.0) + share_of_core
        rest = ", ".join(f"{name} {100 * u:.1f}%" for name, u in sorted(parts.items(), key=lambda kv: -kv[1]) if u > 0.002)
        print(f"  adapt worker {pid}: {100 * share[pid]:.1f}% in all; its busiest thread {100 * used[busiest][0]:.1f}% "
              f"(the one running the actor's calls); the others: {rest or 'none above 0.2%'}")
    if len(rows_before) and len(rows_after) > len(rows_before):
        (w0, s0), (w1, s1) = rows_before[-1], rows_after[-1]
        print(f"  tasks/s over the window: {(s1 - s0) * meta_batch(args) / (w1 - w0):.1f}")


def meta_batch(args) -> int:
    from reptile_dist.config import load_config, parse_overrides

    return load_config(args.config, parse_overrides(args.overrides)).meta_batch_size


if __name__ == "__main__":
    main()
