"""Files from users never run code, and nothing the project starts listens beyond 127.0.0.1."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import ray
import yaml

REPO = Path(__file__).parents[1]
SHIPPED = [p for folder in ("gid", "search", "clusters") for p in sorted((REPO / folder).rglob("*")) if p.is_file()]


def shipped_text(suffixes: tuple[str, ...]) -> dict[Path, str]:
    return {p: p.read_text() for p in SHIPPED if p.suffix in suffixes}


def test_yaml_is_only_parsed_with_safe_load():
    for path, text in shipped_text((".py",)).items():
        assert not re.search(r"yaml\.(load|full_load|unsafe_load|load_all)\(|Loader\s*=", text), path
    assert "yaml.safe_load(" in (REPO / "gid" / "config.py").read_text()


def test_torch_load_is_only_called_with_weights_only():
    calls = [(path, call) for path, text in shipped_text((".py",)).items() for call in re.findall(r"torch\.load\([^)]*\)", text)]
    assert calls and all("weights_only=True" in call for _, call in calls), calls


def test_a_yaml_file_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    text = f"model: !!python/object/apply:os.system ['touch {marker}']\n"
    yaml.unsafe_load(text)  # control: a loader that builds Python objects does run it
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "evil.yaml"
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "gid.cli", "train", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"gid: error: {path}: not valid YAML at line 1: could not determine a constructor")
    assert not marker.exists()


def test_services_are_started_on_loopback_only():
    code = shipped_text((".sh", ".yaml", ".py"))
    assert not [path for path, text in code.items() if "0.0.0.0" in text]
    lines = [line for text in shipped_text((".sh", ".yaml", ".py", ".md")).values() for line in text.splitlines()]
    mlflow_servers = [line for line in lines if "mlflow server" in line and "--host" in line]
    ray_heads = [line for line in lines if "--dashboard-host" in line]
    assert mlflow_servers and all("--host 127.0.0.1" in line for line in mlflow_servers)
    assert ray_heads and all("--dashboard-host=127.0.0.1" in line for line in ray_heads)
    for cloud in ("aws", "gcp"):  # the launcher configs' head start commands
        assert "--dashboard-host=127.0.0.1" in (REPO / "clusters" / cloud / "cluster.yaml").read_text()


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on ``port`` (Linux's /proc/net/tcp and tcp6)."""
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, local_port = local.split(":")
            if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
                raw = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8))
                found.add(socket.inet_ntop(family, raw))
    return found


def test_the_embedded_ray_dashboard_listens_on_loopback(ray_local):
    # ensure_ray, like this fixture, passes no dashboard_host: Ray's default must keep it on loopback.
    host, port = ray._private.worker.get_dashboard_url().rsplit(":", 1)  # no public API gives it after ray.init
    assert host == "127.0.0.1"
    assert listening_addresses(int(port)) == {"127.0.0.1"}
