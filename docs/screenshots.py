"""Screenshots of a sweep in the MLflow UI, as a person sees it, with headless Chromium.

Serves the sweep's tracking store with a real `mlflow server` and photographs its pages: the
experiment's runs table (the sweep's parent run and its nested trials), a finished trial's metric
charts (in sections: val/, loss/, ...) and its system metrics, the parent run's overview with the sweep
summary as its description, and the model version the sweep registered, if it registered one. Chromium is
Debian's ``chromium`` package (``apt-get install chromium``).

    python docs/screenshots.py --tracking-uri sqlite:///demo/mlflow.db --experiment gid-demo --sweep demo --out docs/img
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
from mlflow.tracking import MlflowClient

from search.metric_names import mlflow_key

SIZE = (1500, 900)
RENDER_SECONDS = 12


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise SystemExit("no Chromium here: install Debian's package (apt-get install chromium) and run this again")
    return found


def serve(tracking_uri: str, port: int, log: Path) -> subprocess.Popen:
    """`mlflow server` over the store, its GenAI job runner off (a training-tracking server needs none)."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", tracking_uri]
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise SystemExit(f"mlflow server did not start:\n{log.read_text()[-2000:]}") from None
            time.sleep(0.5)


def ui_settings(experiment_id: str, sweep_run_id: str) -> dict[str, str]:
    """What the UI keeps in the browser's local storage (as MLflow 3.17's UI writes it): the model-training
    view rather than GenAI's, the assistant panel closed (not opened on first load), and the experiment's
    runs table with the sweep's trials expanded under its run and their objective as a column."""
    runs_table = {  # the UI's own defaults, but for the expanded sweep run and the AP column
        "searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
        "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": [f"metrics.`{mlflow_key('val_ap')}`", "tags.`gid.status`", "attributes.`Source`"], "columnOrder": [],
        "columnWidths": {}, "runsExpanded": {sweep_run_id: True}, "runsPinned": [], "runsHidden": [],
        "runsVisibilityMap": {}, "runsHiddenMode": "FIRST_10_RUNS", "viewMaximized": False, "runListHidden": False,
        "isAccordionReordered": False, "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None,
        "groupsExpanded": {}, "autoRefreshEnabled": False,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }
    return {
        "mlflow.workflowType_v1": '"machine_learning"',
        "mlflow.assistant.panelOpen_v1": "false",
        "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
        f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState': json.dumps(runs_table),
    }


class Browser:
    """Headless Chromium driven over its DevTools protocol (aiohttp, which Ray brings, speaks its websocket)."""

    def __init__(self, executable: str, port: int) -> None:
        # a fresh profile: no state from an earlier run; a file a dying helper wrote last does not fail the shots
        self.profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={self.profile.name}",
             f"--remote-debugging-port={port}", "--remote-allow-origins=*", f"--window-size={SIZE[0]},{SIZE[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: close() ends its helper processes too
        )
        self.port, self._id = port, 0

    async def _page(self, session):
        for _ in range(100):
            try:
                async with session.get(f"http://127.0.0.1:{self.port}/json") as response:
                    targets = await response.json()
                return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            except (OSError, StopIteration, aiohttp.ClientError):
                await asyncio.sleep(0.2)
        raise SystemExit("Chromium did not open its DevTools port")

    async def _call(self, ws, method: str, **params):
        self._id += 1
        await ws.send_json({"id": self._id, "method": method, "params": params})
        while (message := await ws.receive_json()).get("id") != self._id:
            pass
        return message.get("result", {})

    async def shoot_all(
        self, origin: str, settings: dict[str, str], routes: dict[str, str], out: Path, page_text: bool
    ) -> list[Path]:
        async with aiohttp.ClientSession() as session, session.ws_connect(await self._page(session), max_msg_size=0) as ws:
            await self._call(ws, "Page.navigate", url=origin)
            await asyncio.sleep(2)
            stored = "".join(f"localStorage.setItem({k!r}, {v!r});" for k, v in settings.items())
            await self._call(ws, "Runtime.evaluate", expression=stored)
            paths = []
            for name, route in routes.items():
                # A route is a URL fragment: leave the page first, so the app loads afresh, with the settings.
                await self._call(ws, "Page.navigate", url="about:blank")
                await self._call(ws, "Page.navigate", url=f"{origin}/{route}")
                await asyncio.sleep(RENDER_SECONDS)  # the app fetches and draws after it loads
                shot = await self._call(ws, "Page.captureScreenshot", format="png")
                paths.append(out / f"{name}.png")
                paths[-1].write_bytes(base64.b64decode(shot["data"]))
                if page_text:  # what the page says, for a test to read
                    text = await self._call(ws, "Runtime.evaluate", expression="document.body.innerText")
                    (out / f"{name}.txt").write_text(text["result"]["value"])
            return paths

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        # Its helper processes can outlive the main one for a moment, still writing to the profile.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.profile.cleanup()


def pages(client: MlflowClient, experiment: str, sweep: str | None) -> tuple[str, str, dict[str, str]]:
    """The experiment's id, the sweep's run id and the UI routes to photograph: the runs table, a finished
    trial's charts and system metrics, the sweep run's overview and its registered champion (else latest version), of the
    sweep named ``sweep`` (default: the latest)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no MLflow experiment {experiment!r} in this store")
    experiment_id = found.experiment_id
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=500)
    parent = next(
        (r for r in runs if r.data.tags.get("gid.role") == "sweep" and sweep in (None, r.data.tags.get("gid.sweep"))), None
    )
    trial = parent and next(
        (r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
         and r.data.tags.get("gid.role") == "trial" and r.data.tags.get("gid.status") == "finished"), None,
    )
    if parent is None or trial is None:
        raise SystemExit(f"experiment {experiment!r} holds no sweep {sweep or ''} with a finished trial")
    base = f"#/experiments/{experiment_id}"
    view = "?workflowType=machine_learning"
    routes = {
        "mlflow_runs": f"{base}/runs{view}",
        "mlflow_trial_charts": f"{base}/runs/{trial.info.run_id}/model-metrics{view}",
        "mlflow_trial_system": f"{base}/runs/{trial.info.run_id}/system-metrics{view}",
        "mlflow_sweep_run": f"{base}/runs/{parent.info.run_id}{view}",
    }
    sweep_id = parent.data.tags.get("gid.sweep_id")
    registered = [v for v in client.search_model_versions(max_results=1000) if v.tags.get("gid.sweep_id") == sweep_id]
    if registered:
        version = max(registered, key=lambda v: int(v.version))
        with contextlib.suppress(Exception):  # the champion, where it is one of this sweep's (search returns no aliases)
            champion = client.get_model_version_by_alias(version.name, "champion")
            if champion.tags.get("gid.sweep_id") == sweep_id:
                version = champion
        routes["mlflow_registered_model"] = f"#/models/{version.name}/versions/{version.version}"
    return experiment_id, parent.info.run_id, routes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tracking-uri", required=True,
        help="the sweep's store (e.g. sqlite:///demo/mlflow.db, served here) or a running server's http(s) address",
    )
    p.add_argument("--experiment", required=True)
    p.add_argument("--sweep", help="the sweep's name (default: the latest sweep in the experiment)")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    p.add_argument("--port", type=int, default=5077, help="for the MLflow server; Chromium's DevTools take the next")
    p.add_argument("--page-text", action="store_true", help="also write each page's text beside its picture")
    args = p.parse_args(argv)
    executable = chromium()
    experiment_id, sweep_run_id, routes = pages(MlflowClient(args.tracking_uri), args.experiment, args.sweep)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "mlflow-server.log"
    running = args.tracking_uri.startswith(("http://", "https://"))
    server = None if running else serve(args.tracking_uri, args.port, log)
    origin = args.tracking_uri.rstrip("/") if running else f"http://127.0.0.1:{args.port}"
    browser = Browser(executable, args.port + 1)
    try:
        shots = asyncio.run(browser.shoot_all(origin, ui_settings(experiment_id, sweep_run_id), routes, args.out, args.page_text))
        for path, route in zip(shots, routes.values()):
            print(f"{path}  ({route})")
    finally:
        browser.close()
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
            log.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
