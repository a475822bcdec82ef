#!/usr/bin/env python3
"""Issue 3 benchmarks: restart latency and footprint of razar-agent, with anchors from the same run.

Run through bench/supervisor.sh (it builds the release binary first):

    bench/supervisor.sh                 # both benchmarks
    bench/supervisor.sh restart         # restart latency only
    bench/supervisor.sh footprint       # footprint only

Restart latency: a component (`sleep`) is killed with SIGKILL N times (default 100).
Kill -> new pid is the time from just before kill(2) until a new child process of the
supervisor appears in /proc/<supervisor>/task/*/children (polled in a tight loop).
Kill -> ready: for razar-agent, until its /health reports the component `ready` with the new
pid (readiness = exec probe `/bin/true`); for the anchors, which have no readiness, the new
pid time plus one run of the same exec probe by this harness. Anchors on the same command:
runit's `runsv` on a service dir whose run script execs sleep, and supervisord with
autorestart=true, startsecs=0.

Footprint: razar-agent supervising 50 `sleep` components with 1 s sampling, measured over
60 s (CPU seconds from /proc/<pid>/stat utime+stime, RSS from /proc/<pid>/status, PSS from
/proc/<pid>/smaps_rollup), next to prometheus-node-exporter on 127.0.0.1 scraped once per
second over the same 60 s. Every process this script starts is stopped by its pid.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Pause between two looks for the new process (adds at most about this much to a figure).
POLL_S = 0.00005


def children(pid):
    """Child pids of every thread of `pid`."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out.extend(int(p) for p in f.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return out


def stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rfind(")") + 2:].split()


def cpu_seconds(pid):
    """utime + stime of the process itself (its threads), not of its children."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pss_kib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, timeout=30.0, interval=0.005):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)


def stop(proc):
    """Stops a process this script started, by its pid, and reaps it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def percentile(values, p):
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def summary(name, values_ms):
    if not values_ms:
        return f"{name:<34} no samples"
    return (f"{name:<34} median {statistics.median(values_ms):8.2f} ms   "
            f"p95 {percentile(values_ms, 95):8.2f} ms   max {max(values_ms):8.2f} ms   n={len(values_ms)}")


# ---------------------------------------------------------------- razar-agent

def agent_config(work, port, components, readiness=True):
    """A razar-agent config: collector unreachable on purpose (nothing listens on its port)."""
    certs = os.path.join(work, "certs")
    os.makedirs(certs, exist_ok=True)
    for name in ("ca.pem", "agent.pem", "agent.key"):
        open(os.path.join(certs, name), "a").close()
    lines = [
        "[agent]",
        'profile = "bench"',
        f'data_dir = "{work}/data"',
        f'listen = "127.0.0.1:{port}"',
        'sample_interval = "1s"',
        f'log_dir = "{work}/logs"',
        "",
        "[collector]",
        f'address = "127.0.0.1:{free_port()}"',
        'server_name = "collector.bench"',
        f'ca = "{certs}/ca.pem"',
        f'cert = "{certs}/agent.pem"',
        f'key = "{certs}/agent.key"',
        "",
        "[gpu]",
        'source = "none"',
        "",
    ]
    for name in components:
        lines += [
            "[[component]]",
            f'name = "{name}"',
            f'command = "{shutil.which("sleep")}"',
            'args = ["100000"]',
            'stop_grace = "2s"',
            "",
        ]
        if readiness:
            lines += [
                "[component.readiness]",
                'kind = "exec"',
                f'command = ["{shutil.which("true")}"]',
                'interval = "5ms"',
                'timeout = "1s"',
                "",
            ]
        lines += [
            "[component.restart]",
            'policy = "always"',
            'initial_backoff = "0s"',
            'max_backoff = "0s"',
            "",
            "[component.give_up]",
            "max_failures = 1000000",
            'window = "1s"',
            "",
        ]
    path = os.path.join(work, "agent.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def health(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.load(r)


def component_status(port, name):
    for c in health(port)["components"]:
        if c["name"] == name:
            return c
    return None


def start_agent(binary, config, work):
    log = open(os.path.join(work, "agent.out"), "w")
    return subprocess.Popen([binary, "run", "--config", config], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


# ---------------------------------------------------------------- restart latency

def kill_loop(label, supervisor_pid, runs, is_target, ready_check, settle):
    """Kills the supervised process `runs` times; returns (to_new_pid_ms, to_ready_ms).

    Each process is left running for `settle` seconds before it is killed: runsv delays a
    restart by 1 s when the run script lived less than 1 s, so every supervisor gets
    processes that lived longer than that."""
    to_pid, to_ready = [], []

    def current():
        found = [p for p in children(supervisor_pid) if is_target(p)]
        return found[0] if len(found) == 1 else None

    old = wait_for(f"{label}: first process", current)
    born = time.monotonic()
    for _ in range(runs):
        # Settled: the process runs and is ready.
        ready_check(old, time.monotonic() + 30)
        time.sleep(max(0.0, settle - (time.monotonic() - born)))
        t0 = time.perf_counter_ns()
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 30
        new = None
        while new is None:
            fresh = [p for p in children(supervisor_pid) if p != old]
            if fresh:
                # razar-agent may have forked a readiness probe right after the component
                # by the time this loop looks: the component is the older (lower) pid.
                new = min(fresh)
            elif time.monotonic() > deadline:
                raise RuntimeError(f"{label}: no new process after kill")
            else:
                # Yield the core for a moment: on a small machine a spinning poller would
                # compete with the supervisor it measures.
                time.sleep(POLL_S)
        t1 = time.perf_counter_ns()
        born = time.monotonic()
        ready_check(new, deadline)
        t2 = time.perf_counter_ns()
        to_pid.append((t1 - t0) / 1e6)
        to_ready.append((t2 - t0) / 1e6)
        # The new pid may still be a fork that has not exec'd the target yet.
        old = wait_for(f"{label}: new process runs the target", lambda: new if is_target(new) else None,
                       interval=0.0005)
    return to_pid, to_ready


def probe_ready(_pid, _deadline):
    """The anchors' 'ready': one run of the same exec probe."""
    subprocess.run([shutil.which("true")], check=True)


def bench_restart_razar(binary, runs, work, settle):
    port = free_port()
    config = agent_config(work, port, ["target"])
    agent = start_agent(binary, config, work)
    try:
        wait_for("agent /health", lambda: _try(lambda: health(port)), timeout=60, interval=0.05)

        def is_target(pid):
            return comm(pid) == "sleep"

        def ready(pid, deadline):
            while True:
                c = _try(lambda: component_status(port, "target"))
                if c and c["state"] == "ready" and c["pid"] == pid:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"razar-agent: component not ready with pid {pid}: {c}")
                time.sleep(0.0005)

        return kill_loop("razar-agent", agent.pid, runs, is_target, ready, settle)
    finally:
        stop(agent)


def bench_restart_runsv(runs, work, settle):
    service = os.path.join(work, "runsv-service")
    os.makedirs(service, exist_ok=True)
    run = os.path.join(service, "run")
    with open(run, "w") as f:
        f.write(f"#!/bin/sh\nexec {shutil.which('sleep')} 100000\n")
    os.chmod(run, 0o755)
    runsv = subprocess.Popen([shutil.which("runsv"), service], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return kill_loop("runsv", runsv.pid, runs, lambda p: comm(p) == "sleep", probe_ready, settle)
    finally:
        # runsv: SIGTERM makes it stop the service and exit.
        stop(runsv)


def bench_restart_supervisord(runs, work, settle):
    conf = os.path.join(work, "supervisord.conf")
    with open(conf, "w") as f:
        f.write(f"""[supervisord]
nodaemon=true
logfile={work}/supervisord.log
pidfile={work}/supervisord.pid
childlogdir={work}

[program:target]
command={shutil.which('sleep')} 100000
autorestart=true
startsecs=0
startretries=1000000
stopsignal=KILL
""")
    sup = subprocess.Popen([shutil.which("supervisord"), "-c", conf], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return kill_loop("supervisord", sup.pid, runs, lambda p: comm(p) == "sleep", probe_ready, settle)
    finally:
        stop(sup)


def _try(f):
    try:
        return f()
    except Exception:  # noqa: BLE001 - polling a server that may not be up yet
        return None


def restart(binary, runs, supervisord_runs, settle):
    print(f"== Restart latency: SIGKILL x {runs} (supervisord x {supervisord_runs}), "
          f"kill -> new pid and kill -> ready (exec probe /bin/true); each process lives {settle} s before its kill")
    results = {}
    with tempfile.TemporaryDirectory(prefix="razar-bench-") as work:
        results["razar-agent"] = bench_restart_razar(binary, runs, os.path.join(work, "razar"), settle)
    with tempfile.TemporaryDirectory(prefix="razar-bench-") as work:
        results["runsv"] = bench_restart_runsv(runs, work, settle)
    with tempfile.TemporaryDirectory(prefix="razar-bench-") as work:
        results["supervisord"] = bench_restart_supervisord(supervisord_runs, work, settle)
    for name, (to_pid, to_ready) in results.items():
        print(summary(f"{name}: kill -> new pid", to_pid))
        print(summary(f"{name}: kill -> ready", to_ready))
    ours = statistics.median(results["razar-agent"][0])
    runsv = statistics.median(results["runsv"][0])
    p95 = percentile(results["razar-agent"][0], 95)
    print(f"goal: median kill->new pid <= runsv's ({ours:.2f} vs {runsv:.2f} ms): "
          f"{'met' if ours <= runsv else 'NOT met'}; p95 < 5 ms ({p95:.2f} ms): {'met' if p95 < 5 else 'NOT met'}")
    return results


# ---------------------------------------------------------------- footprint

def footprint(binary, seconds, count):
    print(f"== Footprint: razar-agent supervising {count} components (sleep), 1 s sampling, "
          f"{seconds} s; anchor prometheus-node-exporter scraped every 1 s over the same {seconds} s")
    with tempfile.TemporaryDirectory(prefix="razar-bench-") as work:
        port = free_port()
        names = [f"c{i:02}" for i in range(count)]
        config = agent_config(work, port, names, readiness=False)
        agent = start_agent(binary, config, work)
        ne_port = free_port()
        exporter = subprocess.Popen([shutil.which("prometheus-node-exporter"),
                                     f"--web.listen-address=127.0.0.1:{ne_port}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            def all_running():
                h = _try(lambda: health(port))
                return h and sum(1 for c in h["components"] if c["state"] == "ready") == count
            wait_for(f"{count} components ready", all_running, timeout=120, interval=0.1)
            wait_for("node exporter", lambda: _try(lambda: scrape(ne_port)), timeout=30, interval=0.1)
            time.sleep(2)  # let start-up work settle before the window opens
            a0, n0 = cpu_seconds(agent.pid), cpu_seconds(exporter.pid)
            t0 = time.monotonic()
            peak_a = peak_n = 0
            next_tick = t0
            while time.monotonic() - t0 < seconds:
                scrape(ne_port)
                peak_a = max(peak_a, rss_kib(agent.pid))
                peak_n = max(peak_n, rss_kib(exporter.pid))
                next_tick += 1.0
                time.sleep(max(0.0, next_tick - time.monotonic()))
            elapsed = time.monotonic() - t0
            a1, n1 = cpu_seconds(agent.pid), cpu_seconds(exporter.pid)
            rows = [
                ("razar-agent", a1 - a0, rss_kib(agent.pid), peak_a, pss_kib(agent.pid)),
                ("prometheus-node-exporter", n1 - n0, rss_kib(exporter.pid), peak_n, pss_kib(exporter.pid)),
            ]
            running = sum(1 for c in health(port)["components"] if c["state"] == "ready")
        finally:
            stop(exporter)
            stop(agent)
    for name, cpu, rss, peak, pss in rows:
        print(f"{name:<26} CPU {cpu:6.2f} s over {elapsed:.0f} s ({100 * cpu / elapsed:5.2f} % of a core)   "
              f"RSS {rss / 1024:6.1f} MiB (peak {peak / 1024:6.1f})   PSS {pss / 1024:6.1f} MiB")
    print(f"components still ready at the end: {running}/{count}")
    agent_cpu, ne_cpu = rows[0][1], rows[1][1]
    print(f"goal: agent RSS < 12 MiB ({rows[0][3] / 1024:.1f} MiB peak): {'met' if rows[0][3] < 12 * 1024 else 'NOT met'}; "
          f"agent CPU <= half of node_exporter's ({agent_cpu:.2f} vs {ne_cpu:.2f} s): "
          f"{'met' if agent_cpu <= ne_cpu / 2 else 'NOT met'}")
    return rows


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return len(r.read())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", choices=["all", "restart", "footprint"], default="all")
    parser.add_argument("--agent", required=True, help="path to the razar-agent binary")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--supervisord-runs", type=int, default=100)
    parser.add_argument("--settle", type=float, default=1.1,
                        help="seconds each process lives before it is killed (runsv delays restarts of younger ones)")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--components", type=int, default=50)
    args = parser.parse_args()
    for tool in ("runsv", "supervisord", "prometheus-node-exporter", "sleep", "true"):
        if shutil.which(tool) is None:
            sys.exit(f"missing {tool}: apt-get install -y --no-install-recommends runit supervisor "
                     f"prometheus-node-exporter (after writing `exit 101` to /usr/sbin/policy-rc.d)")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}   host: {os.uname().nodename}   cpus: {os.cpu_count()}   "
          f"kernel: {os.uname().release}")
    if args.which in ("all", "restart"):
        restart(args.agent, args.runs, args.supervisord_runs, args.settle)
    if args.which in ("all", "footprint"):
        footprint(args.agent, args.seconds, args.components)


if __name__ == "__main__":
    main()
