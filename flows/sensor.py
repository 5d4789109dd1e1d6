"""The data sensor: a scheduled flow that emits ``bard.data.updated`` when its sources' data changed.

It digests the sources as curation does (`tasks/sources.py`: content for local files, the revision for
hub datasets), compares with what it saw last time (a Prefect Variable per watch, so the memory lives
with the server, not on one machine), and emits one event naming the watch. The pipeline deployment of
the same name has a trigger on that event (`flows/deployments.py`). The first look only records.
"""

from __future__ import annotations

import datetime

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from prefect.variables import Variable
from pydantic import BaseModel, Field, field_validator

from tasks.sources import retry_on_hub_io, sources_digest

EVENT = "bard.data.updated"


def resource_id(watch: str) -> str:
    return f"bard.sources.{watch}"


class SensorParams(BaseModel):
    """Shown as a form in the Prefect UI."""

    sources: dict[str, str] = Field(description="source kind → URI, as the pipeline deployment's")
    watch: str = Field("default", description="name of this watch: the event's resource is bard.sources.<watch>")

    @field_validator("watch")
    @classmethod
    def _name(cls, watch: str) -> str:
        if not watch or not all(c.islower() or c.isdigit() or c in "-_" for c in watch):
            raise ValueError(f"watch {watch!r}: use lowercase letters, digits, '-' and '_'")
        return watch


@task(name="digest-sources", retries=3, retry_delay_seconds=20, retry_condition_fn=retry_on_hub_io)
def digest_task(sources: dict[str, str]) -> dict[str, str]:
    return sources_digest(sources)


@flow(name="data-sensor", log_prints=True)
def data_sensor_flow(params: SensorParams) -> dict:
    digests = digest_task(params.sources)
    key = f"bard-sources-{params.watch}"
    previous = Variable.get(key, default=None)
    Variable.set(key, {"digests": digests, "sources": params.sources,
                       "seen": datetime.datetime.now(datetime.timezone.utc).isoformat()}, overwrite=True)
    changed = sorted(k for k in digests if previous is not None and previous["digests"].get(k) != digests[k])
    if previous is not None and (previous["digests"].keys() != digests.keys()):
        changed = sorted(set(changed) | (previous["digests"].keys() ^ digests.keys()))
    if previous is None:
        print(f"watch {params.watch}: first look, recorded {len(digests)} source digest(s)")
    elif changed:
        emit_event(event=EVENT, resource={"prefect.resource.id": resource_id(params.watch),
                                          "prefect.resource.name": params.watch},
                   payload={"sources": params.sources, "changed": changed, "digests": digests})
        print(f"watch {params.watch}: {', '.join(changed)} changed; emitted {EVENT}")
    else:
        print(f"watch {params.watch}: unchanged")
    verdict = "first look" if previous is None else f"changed: {', '.join(changed)}" if changed else "unchanged"
    rows = [f"| {kind} | `{params.sources[kind]}` | `{digests[kind][:23]}` | {'changed' if kind in changed else '-'} |"
            for kind in digests]
    create_markdown_artifact("\n".join([f"# Data sensor `{params.watch}`: {verdict}", "",
                                         "| source | URI | digest | |", "|---|---|---|---|", *rows]),
                             key=f"data-sensor-{params.watch.replace('_', '-')}", description="the sources' digests at this look")
    return {"watch": params.watch, "changed": changed, "first": previous is None, "digests": digests}
