"""The files in cluster/: they parse, Ray accepts them, and they keep the cluster closed.

No network and no cloud: launcher configs go through Ray's own schema and config
preparation, KubeRay manifests, the NetworkPolicy and the runtime environment are checked field
by field (the policy against the labels KubeRay gives the pods), local.sh is run only where it
needs no Ray (usage, `down` with nothing running, `up` refused before it starts anything).
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv

from reptile_dist.engine.cluster import HEAD_RESOURCE, SYSTEM_CONFIG

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
KUBERAY_MANIFESTS = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]
NETWORK_POLICY = "kuberay/networkpolicy.yaml"
RAY_UID, RAY_GID = 1000, 100  # user `ray` and its group `users` in the rayproject/ray images
JOB_API_PORT = [{"port": 8265, "protocol": "TCP"}]
# The sources networkpolicy.yaml admits to the head's job API besides the cluster's own pods.
CLIENT_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "REPLACE_ME_CLIENT_NAMESPACE"}},
               "podSelector": {"matchLabels": {"reptile-dist/ray-client": "true"}}}
OPERATOR_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
                 "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}
RAY_PORTS = {6379, 8265, 10001}  # GCS, dashboard/job API, Ray Client
WORLD = {"0.0.0.0/0", "::/0"}


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


def pod_templates(manifest: dict) -> dict[str, dict]:
    """Every pod template a manifest defines: the head, each worker group, a RayJob's submitter."""
    spec = cluster_spec(manifest)
    pods = {"head": spec["headGroupSpec"]["template"]}
    pods |= {f"worker group {g['groupName']}": g["template"] for g in spec["workerGroupSpecs"]}
    if manifest["kind"] == "RayJob":
        pods["submitter"] = manifest["spec"]["submitterPodTemplate"]
    return pods


def kuberay_containers(manifest: dict) -> list[tuple[str, dict, dict]]:
    """(where, pod spec, container) for every container the manifest makes KubeRay run, the
    autoscaler it adds to the head pod included (its settings come from autoscalerOptions)."""
    found = []
    for role, template in pod_templates(manifest).items():
        pod = template["spec"]
        for c in pod["containers"] + pod.get("initContainers", []):
            found.append((f"{role}: {c['name']}", pod, c))
    spec = cluster_spec(manifest)
    if spec.get("enableInTreeAutoscaling"):
        options = spec.get("autoscalerOptions", {})
        autoscaler = {"name": "autoscaler", "securityContext": options.get("securityContext", {}),
                      "volumeMounts": options.get("volumeMounts", [])}
        found.append(("head: autoscaler", spec["headGroupSpec"]["template"]["spec"], autoscaler))
    return found


def unsafe_settings(pod: dict, container: dict) -> list[str]:
    """What keeps a container from running as the unprivileged `ray` user on a read-only root
    with a private, writable /tmp (Ray's /tmp/ray lives there)."""
    problems = []
    pod_context = pod.get("securityContext", {})
    context = {**pod_context, **container.get("securityContext", {})}  # the container's win
    for key, wanted in [("runAsNonRoot", True), ("runAsUser", RAY_UID), ("runAsGroup", RAY_GID),
                        ("allowPrivilegeEscalation", False), ("readOnlyRootFilesystem", True),
                        ("seccompProfile", {"type": "RuntimeDefault"})]:
        if context.get(key) != wanted:
            problems.append(f"{key} is {context.get(key)!r}, not {wanted!r}")
    if context.get("privileged"):
        problems.append("privileged")
    capabilities = context.get("capabilities", {})
    if capabilities.get("drop") != ["ALL"] or capabilities.get("add"):
        problems.append(f"capabilities {capabilities}, not drop [ALL]")
    if pod_context.get("fsGroup") != RAY_GID:
        problems.append(f"pod fsGroup is {pod_context.get('fsGroup')!r}")
    if any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")):
        problems.append("shares a host namespace")
    tmp = [m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    if not tmp or "emptyDir" not in volumes.get(tmp[0], {}):
        problems.append("no emptyDir at /tmp")
    return problems


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # matchExpressions: none here, so not modelled
    return selector.get("matchLabels", {}).items() <= labels.items()


def ray_pod_labels(template: dict, cluster_name: str, node_type: str, group: str) -> dict:
    """The labels KubeRay gives a Ray pod: the template's, except that it sets these keys itself."""
    return {**template.get("metadata", {}).get("labels", {}), "ray.io/cluster": cluster_name,
            "ray.io/node-type": node_type, "ray.io/group": group, "ray.io/is-ray-node": "yes",
            "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}


def cluster_pods(manifest: dict) -> dict[str, dict]:
    """Labels of the Ray pods the manifest makes, by role. A RayJob's cluster is named
    <job>-<5 random characters>, so nothing may rely on that name."""
    name = manifest["metadata"]["name"]
    cluster_name = f"{name}-x7k2q" if manifest["kind"] == "RayJob" else name
    spec = cluster_spec(manifest)
    pods = {"head": ray_pod_labels(spec["headGroupSpec"]["template"], cluster_name, "head", "headgroup")}
    for g in spec["workerGroupSpecs"]:
        pods[f"worker {g['groupName']}"] = ray_pod_labels(g["template"], cluster_name, "worker", g["groupName"])
    return pods


def submitter_pod(manifest: dict) -> dict:
    """Labels of a RayJob's submitter pod: the template's plus those of the Job KubeRay names after it."""
    name = manifest["metadata"]["name"]
    labels = manifest["spec"]["submitterPodTemplate"].get("metadata", {}).get("labels", {})
    return {**labels, "batch.kubernetes.io/job-name": name, "job-name": name}


def admitted(policies: list[dict], pod: dict) -> list[dict] | None:
    """The ingress rules that apply to a pod with these labels; None when no policy isolates it."""
    chosen = [p for p in policies if selects(p["spec"]["podSelector"], pod) and "Ingress" in p["spec"]["policyTypes"]]
    return [rule for p in chosen for rule in p["spec"].get("ingress", [])] if chosen else None


def pinning_problem(image: str) -> str | None:
    """Why an image reference can change under a cluster: no tag (= latest), a tag that is no
    exact version (latest, nightly, 2.60-py311), a malformed digest. None when pinned."""
    name, _, digest = image.partition("@")
    if digest:
        return None if re.fullmatch(r"sha256:[0-9a-f]{64}", digest) else f"{image}: malformed digest"
    last = name.rsplit("/", 1)[-1]  # a registry's port is not a tag
    if ":" not in last:
        return f"{image}: no tag, which means latest"
    tag = last.split(":", 1)[1]
    if not re.fullmatch(r"\d+\.\d+\.\d+(-[\w.-]+)?", tag):
        return f"{image}: {tag} is not an exact version"
    return None


def shipped_images() -> dict[str, list[str]]:
    """Every container image the files in cluster/ name, by file."""
    images = {"Dockerfile": re.findall(r"^FROM\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), flags=re.M)}
    for name in LAUNCHER_CONFIGS:
        docker = load(name)["docker"]
        images[name] = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    for name in KUBERAY_MANIFESTS:
        images[name] = [node["image"] for node in walk(load(name)) if isinstance(node, dict) and "image" in node]
    return images


def local_sh(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLUSTER / "local.sh"), *args], capture_output=True, text=True, env=env, timeout=timeout)


def private_home(tmp_path: Path) -> dict:
    """An environment whose HOME is tmp_path and that names no state directory of its own."""
    names = {"XDG_RUNTIME_DIR", "XDG_CACHE_HOME", "REPTILE_RAY_TEMP_DIR", "RAY_ADDRESS"}
    env = {k: v for k, v in os.environ.items() if k not in names}
    return dict(env, HOME=str(tmp_path))


# --- every file ---------------------------------------------------------------------------

def test_every_shipped_yaml_parses_into_mappings():
    files = sorted(CLUSTER.rglob("*.yaml"))
    names = {str(f.relative_to(CLUSTER)) for f in files}
    assert set(LAUNCHER_CONFIGS + KUBERAY_MANIFESTS + [NETWORK_POLICY, "runtime_env.yaml"]) <= names
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


def head_system_configs() -> dict[str, dict]:
    """The `--system-config` each cluster/ file gives its head's `ray start`, as parsed JSON."""
    found = {}
    for name in LAUNCHER_CONFIGS:
        heads = [c for c in load(name)["head_start_ray_commands"] if "ray start" in c]
        args = [a for c in heads for a in shlex.split(c.replace("\n", " ")) if a.startswith("--system-config=")]
        assert len(args) == 1, (name, heads)
        found[name] = json.loads(args[0].split("=", 1)[1])
    for name in KUBERAY_MANIFESTS:
        # KubeRay pastes the value into `ray start --system-config=...`: shell-quoted JSON.
        value = cluster_spec(load(name))["headGroupSpec"]["rayStartParams"]["system-config"]
        found[name] = json.loads(shlex.split(value)[0])
    local = re.search(r"^SYSTEM_CONFIG=(.*)$", (CLUSTER / "local.sh").read_text(), re.M)
    assert local and '--system-config="$SYSTEM_CONFIG"' in (CLUSTER / "local.sh").read_text()
    found["local.sh"] = json.loads(shlex.split(local.group(1))[0])
    return found


def test_every_cluster_config_gives_its_head_the_engines_ray_settings():
    # The settings a local cluster starts with (start_local_ray): a cluster/ file that drifted
    # from them would run the engine on Ray's defaults, silently slower.
    configs = head_system_configs()
    assert set(configs) == {*LAUNCHER_CONFIGS, *KUBERAY_MANIFESTS, "local.sh"}
    assert all(config == SYSTEM_CONFIG for config in configs.values()), configs


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
    # The RayJob's pods carry one label more, which its NetworkPolicy finds them by.
    job_cluster = copy.deepcopy(rayjob["spec"]["rayClusterSpec"])
    for template in [job_cluster["headGroupSpec"]["template"]] + [g["template"] for g in job_cluster["workerGroupSpecs"]]:
        assert template.pop("metadata") == {"labels": {"reptile-dist/ray-job": rayjob["metadata"]["name"]}}
    assert job_cluster == raycluster["spec"]
    images = {image for name in KUBERAY_MANIFESTS for image in shipped_images()[name]}
    assert len(images) == 1, images


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_every_kuberay_container_runs_unprivileged_on_a_read_only_root(name):
    found = kuberay_containers(load(name))
    assert {where.split(":")[0] for where, _, _ in found} >= {"head", "worker group gpu"}
    assert any(where == "head: autoscaler" for where, _, _ in found)
    assert name != "kuberay/rayjob.yaml" or any(where.startswith("submitter") for where, _, _ in found)
    problems = {where: unsafe_settings(pod, c) for where, pod, c in found}
    assert not any(problems.values()), problems


def test_security_check_catches_each_unsafe_setting():
    pod = load("kuberay/raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]
    container = pod["containers"][0]
    assert unsafe_settings(pod, container) == []
    as_root = dict(container, securityContext=dict(container["securityContext"], runAsUser=0))
    escalating = dict(container, securityContext=dict(container["securityContext"], allowPrivilegeEscalation=True))
    net_raw = dict(container, securityContext=dict(container["securityContext"],
                                                   capabilities={"drop": ["ALL"], "add": ["NET_RAW"]}))
    writable_root = dict(container, securityContext=dict(container["securityContext"], readOnlyRootFilesystem=False))
    no_tmp = dict(container, volumeMounts=[])
    unconfined = dict(pod, securityContext=dict(pod["securityContext"], seccompProfile={"type": "Unconfined"}))
    for bad in (as_root, escalating, net_raw, writable_root, no_tmp):
        assert unsafe_settings(pod, bad), bad
    assert unsafe_settings(unconfined, container)
    assert unsafe_settings(dict(pod, hostNetwork=True), container)


# --- NetworkPolicy ------------------------------------------------------------------------

def test_network_policies_are_ingress_policies_for_the_shipped_clusters():
    policies = list(yaml.safe_load_all((CLUSTER / NETWORK_POLICY).read_text()))
    assert policies
    assert all(p["apiVersion"] == "networking.k8s.io/v1" and p["kind"] == "NetworkPolicy" for p in policies)
    pods = [labels for name in KUBERAY_MANIFESTS for labels in cluster_pods(load(name)).values()]
    for p in policies:
        assert "Ingress" in p["spec"]["policyTypes"], p["metadata"]["name"]
        # Each selects Ray pods of a shipped manifest: a rename there would leave it guarding nothing.
        assert any(selects(p["spec"]["podSelector"], labels) for labels in pods), p["metadata"]["name"]


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_network_policy_admits_only_the_cluster_itself_and_listed_job_api_clients(name):
    manifest = load(name)
    policies = list(yaml.safe_load_all((CLUSTER / NETWORK_POLICY).read_text()))
    pods = cluster_pods(manifest)
    # Pods that are not of this cluster: the other manifest's, a RayJob's submitter, anyone's.
    others = [labels for other in KUBERAY_MANIFESTS if other != name for labels in cluster_pods(load(other)).values()]
    others += [submitter_pod(load("kuberay/rayjob.yaml")), {"app": "something-else"}, {}]
    expected = [CLIENT_PEER]
    if manifest["kind"] == "RayJob":
        submitter = {"podSelector": {"matchLabels": {"batch.kubernetes.io/job-name": manifest["metadata"]["name"]}}}
        expected += [submitter, OPERATOR_PEER]

    def same_cluster(peer: dict) -> bool:
        return (set(peer) == {"podSelector"} and all(selects(peer["podSelector"], labels) for labels in pods.values())
                and not any(selects(peer["podSelector"], labels) for labels in others))

    for role, labels in pods.items():
        rules = admitted(policies, labels)
        assert rules, f"no policy isolates the {role} pod"
        outside = []
        for rule in rules:
            assert rule.get("from"), f"{role}: a rule without `from` admits every source"
            if all(same_cluster(peer) for peer in rule["from"]):
                continue  # the cluster's own pods, on any port: Ray picks most of its ports at start
            assert role == "head", f"{role} admits {rule['from']}"
            assert rule.get("ports") == JOB_API_PORT, rule
            outside += rule["from"]
        assert any(all(same_cluster(peer) for peer in rule["from"]) for rule in rules), f"{role} shuts out its own cluster"
        if role == "head":
            assert sorted(json.dumps(peer, sort_keys=True) for peer in outside) == sorted(
                json.dumps(peer, sort_keys=True) for peer in expected)


# --- images -------------------------------------------------------------------------------

def test_every_image_is_pinned_to_an_exact_version_or_digest():
    images = shipped_images()
    assert all(images.values()), images
    problems = [pinning_problem(image) for found in images.values() for image in found]
    assert not any(problems), problems
    # The image built from cluster/Dockerfile carries the package's own version.
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    ours = {image for name in KUBERAY_MANIFESTS for image in images[name]}
    assert ours == {f"REPLACE_ME_REGISTRY/reptile-dist:{version}"}, ours


def test_pinning_check_catches_floating_references():
    for floating in ["rayproject/ray", "rayproject/ray:latest", "rayproject/ray:2.60-py311",
                     "rayproject/ray:nightly-py311-gpu", "registry.example:5000/reptile-dist", "rayproject/ray@sha256:abc"]:
        assert pinning_problem(floating), floating
    for pinned in ["rayproject/ray:2.60.0-py311-gpu", "registry.example:5000/reptile-dist:0.1.0",
                   "rayproject/ray@sha256:" + "0" * 64]:
        assert pinning_problem(pinned) is None, pinned


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
    assert f'--resources=\'{{"{HEAD_RESOURCE}": 100}}\'' in text
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
    result = local_sh("down", env=env)
    assert result.returncode == 0, result.stderr
    assert "No local Ray cluster" in result.stdout


def test_local_sh_names_no_fixed_tmp_path():
    code = [line for line in (CLUSTER / "local.sh").read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if "/tmp" in line]
    text = "\n".join(code)
    assert '(umask 077 && mkdir -p "$STATE_DIR")' in text
    # Ray makes its temp dir world-writable, so it sits inside the private one.
    assert 'TEMP_DIR="$STATE_DIR/ray"' in text and '--temp-dir="$TEMP_DIR"' in text


def test_local_sh_keeps_its_state_in_a_private_directory_under_home(tmp_path):
    result = local_sh("down", env=private_home(tmp_path))
    assert result.returncode == 0, result.stderr
    state = tmp_path / ".cache" / "reptile-local"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert str(state) in result.stdout


def test_local_sh_prefers_the_runtime_dir_and_closes_an_open_one(tmp_path):
    runtime = tmp_path / "run"
    (runtime / "reptile-local").mkdir(parents=True, mode=0o755)
    (runtime / "reptile-local").chmod(0o755)
    result = local_sh("status", env=dict(private_home(tmp_path), XDG_RUNTIME_DIR=str(runtime)))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((runtime / "reptile-local").stat().st_mode) == 0o700
    assert not (tmp_path / ".cache").exists()


def test_local_sh_refuses_a_state_directory_that_is_a_link(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "state").symlink_to(elsewhere)
    result = local_sh("down", env=dict(private_home(tmp_path), REPTILE_RAY_TEMP_DIR=str(tmp_path / "state")))
    assert result.returncode == 1 and "is not this user's own directory" in result.stderr


def test_local_sh_up_refuses_a_path_too_long_for_rays_sockets_before_starting_anything(tmp_path):
    env = dict(private_home(tmp_path), REPTILE_RAY_TEMP_DIR=str(tmp_path / ("x" * 40)))
    try:
        result = local_sh("up", "1", env=env)
        assert result.returncode == 1 and "too long for Ray's socket paths" in result.stderr, result.stderr
        assert not (tmp_path / ".ray").exists()  # no token generated: it stopped before any `ray`
    finally:
        local_sh("down", env=env)


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
