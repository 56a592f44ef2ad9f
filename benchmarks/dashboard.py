"""The Grafana dashboard's queries against a live local cluster, drawn as a picture.

    python benchmarks/dashboard.py [--seconds 120] [--rate 10] [--out docs/dashboard.png]

Grafana is not a Debian package, Prometheus is (`apt-get install prometheus`): this script
starts 4 nodes of digits_cnn (robust, metrics on), a Prometheus that scrapes them every second,
streams frames to n0 at --rate while n2 is killed at a third of the run and restarted at two
thirds, then runs every query of deploy/grafana/robustdice.json through Prometheus' HTTP API
(`query_range`, the same PromQL Grafana sends) and draws each panel where the dashboard puts it.
So the picture checks the dashboard's PromQL against a real Prometheus too: a query that
Prometheus refuses fails the script. The panels' data are written beside the picture as JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from _results import write_result

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "robustdice.json"
JOB = "robustdice"
STEP_S = 2


def prometheus_query_range(base: str, expr: str, start: float, end: float) -> list:
    query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": STEP_S})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{query}", timeout=30) as r:
        body = json.loads(r.read())
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {expr!r}: {body}")
    return body["data"]["result"]


def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s") from None
            time.sleep(0.2)


def legend(template: str, metric: dict) -> str:
    out = template or "{{instance}}"
    for key, value in metric.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def draw(dashboard: dict, data: dict, out: Path, t0: float, kill_s: float, restart_s: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    fig = plt.figure(figsize=(16, rows * 0.42))
    fig.suptitle(f"{dashboard['title']}: 4 local nodes, n2 killed at {kill_s:.0f} s and restarted at "
                 f"{restart_s:.0f} s (PromQL of deploy/grafana/robustdice.json, via Prometheus)", fontsize=11)
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        ax = fig.add_axes([g["x"] / 24 + 0.01, 1 - (g["y"] + g["h"]) / rows + 0.02, g["w"] / 24 - 0.025,
                           g["h"] / rows - 0.06])
        ax.set_title(panel["title"], fontsize=9, loc="left")
        series = data[str(panel["id"])]
        if panel["type"] == "stat":
            ax.axis("off")
            values = [s["values"][-1][1] for s in series if s["values"]]
            text = "no data" if not values else f"{float(values[0]):.3g}"
            if not values and "joule" in panel["fieldConfig"]["defaults"].get("unit", ""):
                text = "n/a (no power reading)"
            ax.text(0.5, 0.4, text, ha="center", va="center", fontsize=20 if values else 11)
            continue
        for s in series:
            xs, ys = [], []
            for t, v in s["values"]:
                if xs and float(t) - t0 - xs[-1] > 2 * STEP_S:   # no samples: a gap, as Grafana draws it
                    xs.append(np.nan)
                    ys.append(np.nan)
                xs.append(float(t) - t0)
                ys.append(float(v) if v not in ("NaN", "+Inf", "-Inf") else np.nan)
            ax.plot(xs, ys, label=s["label"], linewidth=1.2)
        for at in (kill_s, restart_s):
            ax.axvline(at, color="grey", linestyle=":", linewidth=1)
        ax.tick_params(labelsize=7)
        if series:
            ax.legend(fontsize=6, loc="upper left", ncol=2)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the stream runs (default 120)")
    parser.add_argument("--rate", type=float, default=10.0, help="frames per second to n0 (default 10)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    parser.add_argument("--json", action="store_true", help="print the results JSON as the last line")
    parser.add_argument("--replot", action="store_true",
                        help="draw the picture again from benchmarks/results/dashboard.json's series, running nothing")
    args = parser.parse_args(argv)
    results_file = REPO / "benchmarks" / "results" / "dashboard.json"
    if args.replot:
        stored = json.loads(results_file.read_text())
        draw(json.loads(DASHBOARD.read_text()), stored["series"], args.out, stored["t0"], stored["kill_s"],
             stored["restart_s"])
        print(f"wrote {args.out} from {results_file.name} (measured {stored['measured']['utc']})", file=sys.stderr)
        return 0
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        print("prometheus is not installed: apt-get install prometheus (Debian's package)", file=sys.stderr)
        return 2

    from robustdice.node.client import NodeClient
    from robustdice.node.lab.localcluster import LocalCluster, free_ports
    from robustdice.partitioner.core.partition import PartitionRequest, partition
    from robustdice.partitioner.zoo.data import evaluation_split

    dashboard = json.loads(DASHBOARD.read_text())
    images = evaluation_split("digits_cnn")[0].numpy().astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="rd-dash-") as tmp:
        tmp = Path(tmp)
        partition(PartitionRequest("digits_cnn", 4, "robust", tmp / "plan", show_progress=False))
        with LocalCluster(tmp / "plan", threads=1, log_level="WARNING", metrics=True) as cluster:
            for d in range(4):
                cluster.start_node(d)
            cluster.wait_until(cluster.all_alive(), 120.0, "every node to count on every other")
            targets = [cluster.metrics_url(d).split("//")[1].split("/")[0] for d in range(4)]
            (tmp / "prometheus.yml").write_text(json.dumps({
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}]}))
            port = free_ports(1)[0]
            base = f"http://127.0.0.1:{port}"
            prom = subprocess.Popen([prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                                     f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_http(f"{base}/-/ready", 60.0)
                stop = threading.Event()
                answered = {"ok": 0, "error": 0}

                def stream():
                    with NodeClient(cluster.config, "n0", cluster.key_path) as client:
                        i, next_s = 0, time.monotonic()
                        while not stop.is_set():
                            meta = client.submit(images[i % len(images)][None], timeout_s=30).meta
                            answered["error" if "error" in meta else "ok"] += 1
                            i, next_s = i + 1, next_s + 1.0 / args.rate
                            stop.wait(max(0.0, next_s - time.monotonic()))
                t0 = time.time()
                worker = threading.Thread(target=stream)
                worker.start()
                kill_s, restart_s = args.seconds / 3, 2 * args.seconds / 3
                for at, action in ((kill_s, lambda: cluster.kill(2)), (restart_s, lambda: cluster.start_node(2)),
                                   (args.seconds, stop.set)):
                    time.sleep(max(0.0, t0 + at - time.time()))
                    action()
                worker.join(60)
                time.sleep(3 * STEP_S)   # the last scrapes
                end = time.time()
                data = {}
                for panel in dashboard["panels"]:
                    series = []
                    for target in panel["targets"]:
                        expr = target["expr"].replace("$job", JOB)
                        for s in prometheus_query_range(base, expr, t0, end):
                            series.append({"label": legend(target.get("legendFormat", ""), s["metric"]),
                                           "values": s["values"]})
                    data[str(panel["id"])] = series
            finally:
                prom.terminate()
                prom.wait(10)
    draw(dashboard, data, args.out, t0, kill_s, restart_s)
    empty = [p["title"] for p in dashboard["panels"] if not data[str(p["id"])]]
    result = {"seconds": args.seconds, "rate": args.rate, "answered": answered, "picture": str(args.out.resolve().relative_to(REPO)) if args.out.resolve().is_relative_to(REPO) else str(args.out),
              "panels": len(dashboard["panels"]), "panels_without_data": empty,
              "prometheus": subprocess.run([prometheus, "--version"], capture_output=True, text=True).stdout.split("\n")[0],
              "t0": t0, "kill_s": kill_s, "restart_s": restart_s, "series": data}
    print(f"{answered['ok']} frames answered ({answered['error']} errors); {len(dashboard['panels']) - len(empty)} of "
          f"{len(dashboard['panels'])} panels have data (without: {', '.join(empty) or 'none'}); wrote {args.out}",
          file=sys.stderr)
    write_result(result, results_file, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
