"""The files in cluster/: they parse, Ray accepts them, and they keep the cluster closed.

No network and no cloud: launcher configs go through Ray's own schema and config
preparation, KubeRay manifests and the runtime environment are checked field by field,
local.sh is run only where it needs no Ray (usage, `down` with nothing running).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
KUBERAY_MANIFESTS = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]
RAY_PORTS = {6379, 8265, 10001}  # GCS, dashboard/job API, Ray Client
WORLD = {"0.0.0.0/0", "::/0"}
HEAD_RESOURCE = "reptile_head"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def walk(node):
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def world_open_ray_ports(doc) -> list[str]:
    """Ingress rules (AWS IpPermissions, GCP firewall rules) admitting 0.0.0.0/0 to a Ray port."""
    found = []
    for node in walk(doc):
        if not isinstance(node, dict):
            continue
        sources = [r.get("CidrIp") or r.get("CidrIpv6") for r in node.get("IpRanges", []) + node.get("Ipv6Ranges", [])]
        sources += node.get("sourceRanges", [])
        if not WORLD & set(sources):
            continue
        if "FromPort" in node:
            if str(node.get("IpProtocol")) in {"-1", "all"} or node["FromPort"] == -1:
                ports = set(RAY_PORTS)
            else:
                ports = {p for p in RAY_PORTS if node["FromPort"] <= p <= node["ToPort"]}
        else:
            ports = set()
            for allowed in node.get("allowed", []):
                spans = allowed.get("ports") or ["0-65535"]
                for span in spans:
                    lo, _, hi = str(span).partition("-")
                    ports |= {p for p in RAY_PORTS if int(lo) <= p <= int(hi or lo)}
        if ports:
            found.append(f"{sorted(ports)} open to {sorted(WORLD & set(sources))}")
    return found


def dashboard_hosts(text: str) -> list[str]:
    """Every dashboard host a config or script sets, in CLI (--dashboard-host=X) or map form."""
    return re.findall(r"dashboard[-_]host[\"']?\s*[=:\s]\s*[\"']?([^\s\"',}]+)", text)


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


# --- every file ---------------------------------------------------------------------------

def test_every_shipped_yaml_parses_into_mappings():
    files = sorted(CLUSTER.rglob("*.yaml"))
    names = {str(f.relative_to(CLUSTER)) for f in files}
    assert set(LAUNCHER_CONFIGS + KUBERAY_MANIFESTS + ["runtime_env.yaml"]) <= names
    for f in files:
        docs = list(yaml.safe_load_all(f.read_text()))
        assert docs and all(isinstance(d, dict) and d for d in docs), f


def test_no_config_binds_the_dashboard_to_all_interfaces():
    checked = [f for f in CLUSTER.rglob("*") if f.is_file() and (f.suffix in {".yaml", ".sh"} or f.name == "Dockerfile")]
    hosts = {str(f.relative_to(CLUSTER)): dashboard_hosts(f.read_text()) for f in checked}
    assert all(h in {"127.0.0.1", "localhost"} for found in hosts.values() for h in found), hosts
    # The VM head nodes and local.sh say so explicitly rather than relying on Ray's default.
    for name in LAUNCHER_CONFIGS + ["local.sh"]:
        assert hosts[name], f"{name} does not pin the dashboard host"


def test_dashboard_host_detection_sees_both_spellings():
    assert dashboard_hosts("ray start --head --dashboard-host=0.0.0.0") == ["0.0.0.0"]
    assert dashboard_hosts("rayStartParams:\n  dashboard-host: '0.0.0.0'\n") == ["0.0.0.0"]


def test_no_config_opens_ray_ports_to_the_world():
    for f in CLUSTER.rglob("*.yaml"):
        for doc in yaml.safe_load_all(f.read_text()):
            assert world_open_ray_ports(doc) == [], f


def test_port_check_catches_world_open_rules():
    aws_all = {"IpPermissions": [{"IpProtocol": "-1", "FromPort": -1, "ToPort": -1, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
    aws_dash = {"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 9000, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    aws_ssh = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    gcp_gcs = {"sourceRanges": ["0.0.0.0/0"], "allowed": [{"IPProtocol": "tcp", "ports": ["6379"]}]}
    gcp_inside = {"sourceRanges": ["10.40.0.0/24"], "allowed": [{"IPProtocol": "tcp"}]}
    assert world_open_ray_ports(aws_all)
    assert world_open_ray_ports(aws_dash)
    assert world_open_ray_ports(gcp_gcs)
    assert world_open_ray_ports(aws_ssh) == []
    assert world_open_ray_ports(gcp_inside) == []


def test_every_config_runs_the_same_ray_as_this_checkout():
    version = ray.__version__
    images = re.findall(r"rayproject/ray:([\w.\-]+)", (CLUSTER / "Dockerfile").read_text())
    for name in LAUNCHER_CONFIGS:
        docker = load(name)["docker"]
        images += [docker["image"].split(":")[1], docker["head_image"].split(":")[1]]
    assert images and all(tag.startswith(f"{version}-py311") for tag in images), images
    for name in KUBERAY_MANIFESTS:
        assert cluster_spec(load(name))["rayVersion"] == version, name


# --- cluster launcher ---------------------------------------------------------------------

@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_own_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(name)
    validate_config(prepare_config(config))  # schema plus Ray's cross-field checks, offline
    broken = dict(config, head_node_type="no_such_type")
    with pytest.raises(ValueError):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_has_a_cpu_head_with_reptile_head_and_spot_gpu_workers(name):
    config = load(name)
    assert config["cluster_name"] and config["provider"]["type"] == name.removesuffix(".yaml")
    types = config["available_node_types"]
    assert all("resources" in t and "node_config" in t for t in types.values())
    head = types[config["head_node_type"]]
    assert head["resources"][HEAD_RESOURCE] > 0
    assert head["resources"].get("GPU", 0) == 0
    workers = {k: t for k, t in types.items() if k != config["head_node_type"]}
    gpu = {k: t for k, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu, "no GPU worker type"
    assert all(HEAD_RESOURCE not in t["resources"] for t in workers.values())
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu.values()) > 0
    for t in gpu.values():
        node = t["node_config"]
        spot = node.get("InstanceMarketOptions", {}).get("MarketType") == "spot" or (
            node.get("scheduling", {}).get("provisioningModel") == "SPOT")
        assert spot, f"{name}: GPU workers are not spot/preemptible"


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_installs_the_package_without_replacing_an_image_torch(name):
    config = load(name)
    assert config["setup_commands"]
    assert "." in config["file_mounts"].values()  # the checkout being launched from
    for role in ("head_setup_commands", "worker_setup_commands"):
        commands = config[role]
        torch = [c for c in commands if "torch==" in c]
        assert torch and all(c.startswith('python -c "import torch"') and "||" in c for c in torch), role
        assert any(re.search(r"pip install .*reptile-dist", c) for c in commands), role


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_turns_on_token_auth_on_every_node(name):
    config = load(name)
    assert any(remote.endswith(".ray/auth_token") for remote in config["file_mounts"])
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    assert all("RAY_AUTH_MODE=token ray start" in c for c in ray_starts)
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_nodes_join_the_locked_down_network_not_rays_default(name):
    # Without explicit groups Ray creates one admitting SSH from 0.0.0.0/0 (AWS) or picks the
    # default network, which does the same (GCP).
    config = load(name)
    assert "security_group" not in config["provider"]
    for t in config["available_node_types"].values():
        node = t["node_config"]
        if name == "aws.yaml":
            assert node["SecurityGroupIds"], "node type without an explicit security group"
        else:
            subnets = [i["subnetwork"] for i in node["networkInterfaces"]]
            assert subnets and not any(s.endswith("/default") for s in subnets)


# --- KubeRay ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kind", [("kuberay/raycluster.yaml", "RayCluster"), ("kuberay/rayjob.yaml", "RayJob")])
def test_kuberay_manifest_is_a_ray_io_v1_object_with_head_and_workers(name, kind):
    manifest = load(name)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind
    assert manifest["metadata"]["name"]
    spec = cluster_spec(manifest)
    assert containers(spec["headGroupSpec"]["template"])
    assert spec["workerGroupSpecs"] and all(containers(g["template"]) for g in spec["workerGroupSpecs"])
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_kuberay_head_advertises_reptile_head_and_no_gpu(name):
    head = cluster_spec(load(name))["headGroupSpec"]
    params = head["rayStartParams"]
    # KubeRay pastes the value into `ray start --resources=...`, so it is shell-quoted JSON.
    assert json.loads(shlex.split(params["resources"])[0])[HEAD_RESOURCE] > 0
    assert params["num-gpus"] == "0"
    assert all("nvidia.com/gpu" not in c["resources"].get("limits", {}) for c in containers(head["template"]))


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_kuberay_gpu_workers_request_a_gpu_and_tolerate_the_gpu_taint(name):
    groups = cluster_spec(load(name))["workerGroupSpecs"]
    gpu_groups = [g for g in groups if any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in containers(g["template"]))]
    assert gpu_groups
    for group in gpu_groups:
        for c in containers(group["template"]):
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        tolerations = group["template"]["spec"]["tolerations"]
        assert any(
            t["key"] == "nvidia.com/gpu" and t.get("operator") in {"Exists", "Equal"} and t.get("effect", "NoSchedule") == "NoSchedule"
            for t in tolerations
        )


def test_kuberay_manifests_describe_the_same_cluster_with_one_image():
    raycluster, rayjob = load("kuberay/raycluster.yaml"), load("kuberay/rayjob.yaml")
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]
    spec = raycluster["spec"]
    images = {c["image"] for c in containers(spec["headGroupSpec"]["template"])}
    images |= {c["image"] for g in spec["workerGroupSpecs"] for c in containers(g["template"])}
    assert len(images) == 1, images


def test_rayjob_trains_against_its_own_cluster_and_cleans_up():
    spec = load("kuberay/rayjob.yaml")["spec"]
    entrypoint = shlex.split(spec["entrypoint"])
    assert entrypoint[:2] == ["reptile-dist", "train"]
    assert entrypoint[entrypoint.index("--address") + 1] == "auto"
    assert entrypoint[entrypoint.index("--backend") + 1] == "ray"
    assert "://" in entrypoint[entrypoint.index("--out") + 1]  # outlives the cluster
    assert spec["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(env) <= RuntimeEnv.known_fields
    RuntimeEnv(**env)


def test_no_kubernetes_service_is_exposed_outside_the_cluster():
    for f in (CLUSTER / "kuberay").glob("*.yaml"):
        for doc in yaml.safe_load_all(f.read_text()):
            for node in walk(doc):
                if isinstance(node, dict):
                    assert node.get("serviceType", "ClusterIP") == "ClusterIP", f
                    if node.get("kind") == "Service":
                        assert node["spec"].get("type", "ClusterIP") == "ClusterIP", f
                    if node.get("kind") == "Ingress":
                        pytest.fail(f"{f} ships an Ingress")


# --- runtime environment ------------------------------------------------------------------

def test_runtime_env_is_one_ray_accepts():
    env = load("runtime_env.yaml")
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    accepted = RuntimeEnv(**env)  # raises on wrong types, e.g. a non-string env var
    assert accepted["env_vars"]["OMP_NUM_THREADS"] == "1"
    assert ".venv/" in accepted["excludes"] and ".git/" in accepted["excludes"]
    # `ray job submit --working-dir .` supplies the code; a second source would be ambiguous.
    assert "working_dir" not in env and "py_modules" not in env


# --- local.sh -----------------------------------------------------------------------------

def test_local_sh_is_valid_strict_bash():
    script = CLUSTER / "local.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert "export RAY_AUTH_MODE=token" in text
    assert '--resources=\'{"reptile_head": 100}\'' in text
    # Worker nodes unpack runtime environments under their own temp dir: sharing the head's let
    # a job's working_dir be replaced under its running driver (seen with ray job submit).
    assert '--temp-dir="$TEMP_DIR/node-$i"' in text
    # `ray stop` would also stop unrelated Ray instances on the machine.
    assert '"$RAY" stop' not in text
    # The head serves the job API (test_cluster_multinode.py submits to it), on a port of one's choosing.
    assert "--include-dashboard=true" in text and '--dashboard-port="$DASHBOARD_PORT"' in text


def test_local_sh_rejects_unknown_commands_with_usage():
    result = subprocess.run([str(CLUSTER / "local.sh"), "sideways"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


def test_local_sh_down_with_nothing_running_succeeds(tmp_path):
    env = dict(os.environ, REPTILE_RAY_TEMP_DIR=str(tmp_path / "no-cluster"))
    result = subprocess.run([str(CLUSTER / "local.sh"), "down"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "No local Ray cluster" in result.stdout


# --- Dockerfile ---------------------------------------------------------------------------

def test_dockerfile_builds_on_the_ray_gpu_image_and_keeps_its_torch_and_user():
    text = (CLUSTER / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms and all(re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py3\d+-gpu", f) for f in froms), froms
    assert not re.search(r"^USER\s+root", text, flags=re.M)
    torch = [line for line in text.splitlines() if "torch==" in line]
    assert torch and all('python -c "import torch"' in line and "||" in line for line in torch)
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
