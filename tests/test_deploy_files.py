"""The files of deploy/ agree with the code: entrypoints are flows, parameters validate, triggers name the
sensor's event, images and versions match, the RayJob's command parses with bard's own parser."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import shlex
import typing
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _flow(entrypoint: str):
    from prefect import Flow

    path, func = entrypoint.split(":")
    assert (ROOT / path).is_file(), entrypoint
    flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), func)
    assert isinstance(flow, Flow), entrypoint
    return flow


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((DEPLOY / "prefect.yaml").read_text())


def test_every_work_pool_deployment_is_a_flow_with_valid_parameters(prefect_yaml):
    from prefect.client.schemas.schedules import CronSchedule

    assert prefect_yaml["deployments"]
    for dep in prefect_yaml["deployments"]:
        flow = _flow(dep["entrypoint"])
        model = typing.get_type_hints(flow.fn)["params"]
        if "params" in dep.get("parameters", {}):
            model.model_validate(dep["parameters"]["params"])
        assert dep["work_pool"]["name"] in {"bard-local", "bard-k8s"}
        for schedule in dep.get("schedules", []):
            if "cron" in schedule:
                CronSchedule(cron=schedule["cron"])
        if flow.name == "pipeline":
            assert dep["concurrency_limit"] == 1  # one chain at a time per deployment


def test_the_work_pools_deploy_every_flow_that_bard_ui_serves(prefect_yaml):
    from flows.deployments import ServeConfig, build
    from flows.pipeline import PipelineParams

    served = {d.flow_name for d in build(ServeConfig(pipeline=PipelineParams(sources={"llava_ov": "/data"})))}
    declared = {_flow(d["entrypoint"]).name for d in prefect_yaml["deployments"]}
    assert served == {"pipeline", "curate", "evaluate", "gate", "ablation", "data-sensor"} == declared


def test_new_data_triggers_name_the_sensor_event_and_a_sensor_watching_the_same_sources(prefect_yaml):
    from flows.sensor import EVENT, resource_id

    deps = prefect_yaml["deployments"]
    sensors = {d["parameters"]["params"]["watch"]: d["parameters"]["params"]["sources"]
               for d in deps if d["entrypoint"].endswith(":data_sensor_flow")}
    triggered = [d for d in deps if d.get("triggers")]
    assert triggered
    for dep in triggered:
        (trigger,) = dep["triggers"]
        assert trigger["expect"] == [EVENT] and trigger["enabled"]
        watch = dep["name"]
        assert trigger["match"]["prefect.resource.id"] == resource_id(watch)
        assert sensors[watch] == dep["parameters"]["params"]["sources"]


def _dockerfile(name: str) -> str:
    return (DEPLOY / "docker" / name).read_text()


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_images_install_the_pinned_torch_the_running_ray_and_the_whole_package(name):
    text = _dockerfile(name)
    torch_pin = re.search(r"^TORCH\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"pip install {torch_pin}" in text
    ray = importlib.metadata.version("ray")
    assert f'"ray[train,data]=={ray}"' in text
    if name.endswith("cuda"):
        assert re.search(rf"^FROM rayproject/ray:{re.escape(ray)}-py311-cu\d+$", text, re.M)
    copied = set(re.findall(r"^COPY (\S+) ", text, re.M))
    for path in copied:
        assert (ROOT / path).exists(), path
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r'include = \[(.*?)\]', pyproject).group(1)
    assert {p.strip('" *') for p in packages.split(",")} <= copied
    assert 'CMD ["bard"' in text and 'bard = "flows.cli:main"' in pyproject


def _built_images() -> set[str]:
    return {m for name in ("Dockerfile.cpu", "Dockerfile.cuda") for m in re.findall(r"-t (\S+) \.", _dockerfile(name))}


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_the_ray_cluster_runs_our_image_and_ray_and_serves_the_address_flows_join(prefect_yaml):
    cluster = yaml.safe_load((DEPLOY / "kuberay" / "raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster"
    assert cluster["spec"]["rayVersion"] == importlib.metadata.version("ray")
    assert {c["image"] for c in _containers(cluster["spec"])} <= _built_images()
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    client_port = next(p["containerPort"] for p in head["ports"] if p["name"] == "client")
    addresses = {d["parameters"]["params"].get("ray_address") for d in prefect_yaml["deployments"]
                 if "params" in d.get("parameters", {})} - {None}
    # KubeRay names the head's service <cluster>-head-svc
    assert addresses == {f"ray://{cluster['metadata']['name']}-head-svc:{client_port}"}
    pool_images = {d["work_pool"].get("job_variables", {}).get("image") for d in prefect_yaml["deployments"]} - {None}
    assert pool_images <= _built_images()


def test_the_ray_job_runs_a_bard_pipeline_command_that_parses():
    from flows.cli import build_parser
    from flows.cli_pipeline import pipeline_params

    job = yaml.safe_load((DEPLOY / "kuberay" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == importlib.metadata.version("ray")
    assert {c["image"] for c in _containers(job["spec"]["rayClusterSpec"])} <= _built_images()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "bard"
    args = build_parser().parse_args(argv[1:])
    params = pipeline_params(args)  # raises a usage error on anything the real command would refuse
    assert params.recipe.startswith("qwen3-vl") and set(params.sources) == {"llava_ov", "finevision"}
