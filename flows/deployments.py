"""The deployments one machine serves (`bard ui`, `deploy/serve.py`): pipeline, curate, evaluate, gate, ablation,
sensor.

The pipeline deployment runs on a cron schedule and on ``bard.data.updated`` for its own watch (the
sensor deployment of the same name emits it when the sources' data changed), one run at a time: a
machine trains one chain at once, and later triggers queue behind it. ``deploy/prefect.yaml`` declares
the same deployments for work pools (`prefect deploy --all`); a test keeps the two in step.
"""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import BaseModel, Field, field_validator

from flows.pipeline import PipelineParams

DEFAULT_CRON = "0 3 * * 1"  # Mondays 03:00: a weekly re-run (unchanged stages are cached, so it costs the gates)
DEFAULT_SENSOR_SECONDS = 900


class ServeConfig(BaseModel):
    name: str = Field("tiny", description="deployment name (and the sensor's watch)")
    pipeline: PipelineParams = Field(default_factory=PipelineParams, description="the pipeline deployment's parameters")
    cron: str | None = Field(DEFAULT_CRON, description="the pipeline's schedule; None: no schedule")
    sensor_seconds: int = Field(DEFAULT_SENSOR_SECONDS, ge=10, description="how often the data sensor looks")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        from flows.sensor import SensorParams

        return SensorParams(sources={}, watch=name).watch  # the sensor's watch is named after the deployment

    @field_validator("cron")
    @classmethod
    def _cron(cls, cron: str | None) -> str | None:
        from prefect.client.schemas.schedules import CronSchedule

        if cron is not None:
            CronSchedule(cron=cron)  # raises ValueError on a bad expression
        return cron


def build(cfg: ServeConfig) -> list:
    """The RunnerDeployments for `prefect.serve`."""
    from prefect.events import DeploymentEventTrigger

    from flows.ablation import AblationParams, ablation_flow
    from flows.curate import curate_flow
    from flows.evaluate import evaluate_flow, gate_flow
    from flows.pipeline import pipeline_flow
    from flows.sensor import EVENT, SensorParams, data_sensor_flow, resource_id

    params = cfg.pipeline.model_dump(mode="json")
    trigger = DeploymentEventTrigger(name=f"{cfg.name}: new data", expect={EVENT},
                                     match={"prefect.resource.id": resource_id(cfg.name)})
    deployments = [
        pipeline_flow.to_deployment(
            name=cfg.name, parameters={"params": params}, cron=cfg.cron, triggers=[trigger], concurrency_limit=1,
            tags=["bard", cfg.pipeline.recipe], description=f"the {cfg.pipeline.recipe} chain: curate → stages with "
                                                            "gates → report; weekly and on new data"),
        curate_flow.to_deployment(name=cfg.name, tags=["bard"], description="Ray Data curation of the sources"),
        evaluate_flow.to_deployment(name=cfg.name, tags=["bard"], description="lm-eval + decode speed of a checkpoint"),
        gate_flow.to_deployment(name=cfg.name, tags=["bard"], description="a stage's gate against its AR base"),
        ablation_flow.to_deployment(  # on demand only: hours of training at the recipe's budget
            name=cfg.name, concurrency_limit=1, tags=["bard", cfg.pipeline.recipe],
            parameters={"params": AblationParams(recipe=cfg.pipeline.recipe, sources=cfg.pipeline.sources,
                                                 include_paths=cfg.pipeline.include_paths,
                                                 root=f"{cfg.pipeline.root}/ablation").model_dump(mode="json")},
            description="the paper's claims and our departures as variants at one training budget, with seeds"),
    ]
    if cfg.pipeline.sources:  # the built-in world is written by the pipeline itself: nothing to watch
        sensor = SensorParams(sources=cfg.pipeline.sources, watch=cfg.name)
        deployments.append(data_sensor_flow.to_deployment(
            name=cfg.name, interval=cfg.sensor_seconds, parameters={"params": sensor.model_dump()}, tags=["bard"],
            description=f"emits {EVENT} for {resource_id(cfg.name)} when the sources' data changed"))
    return deployments


def serve(cfg: ServeConfig) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*build(cfg), print_starting_message=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serve", description="serve the bard deployments on this machine "
                                                               "(PREFECT_API_URL names the server)")
    parser.add_argument("--config", default="{}", help="a ServeConfig as JSON (default: the tiny recipe's)")
    args = parser.parse_args(argv)
    cfg = ServeConfig.model_validate(json.loads(args.config))
    serve(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
