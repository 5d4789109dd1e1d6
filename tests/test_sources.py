"""Source digests (curation's cache key and the sensor's signal), retries on hub I/O only, the sensor flow."""

from __future__ import annotations

import shutil

import pytest


def test_a_local_digest_follows_the_bytes_and_names_not_the_timestamps(world_dir, tmp_path):
    from tasks.sources import source_digest

    src = tmp_path / "llava_ov"
    shutil.copytree(world_dir / "sources" / "llava_ov", src)
    first = source_digest(str(src))
    assert first.startswith("sha256:") and source_digest(str(src)) == first
    assert source_digest(f"stream://{src}?split=train") == first  # the same files read as a stream
    for f in src.rglob("*.parquet"):
        f.touch()  # a new mtime, the same bytes
    assert source_digest(str(src)) == first
    victim = sorted(src.rglob("*.parquet"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    assert source_digest(str(src)) != first
    with pytest.raises(ValueError, match="no such file"):
        source_digest(str(tmp_path / "nope"))


def test_a_hub_source_needs_the_hub_and_says_so(monkeypatch):
    from tasks.sources import HubUnavailable, source_digest, transient

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailable, match="HF_HUB_OFFLINE") as info:
        source_digest("hf://HuggingFaceM4/FineVision?subsets=a&split=train")
    assert transient(info.value) and not transient(ValueError("bad schema"))


def test_tasks_retry_hub_io_failures_and_nothing_else(prefect_server):
    from prefect import flow, task

    from tasks.sources import HubUnavailable, retry_on_hub_io

    calls = {"hub": 0, "bad": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_on_hub_io)
    def flaky_hub():
        calls["hub"] += 1
        if calls["hub"] < 3:
            raise HubUnavailable("503 from the hub")
        return "ok"

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_on_hub_io)
    def wrong_schema():
        calls["bad"] += 1
        raise ValueError("source llava_ov: missing columns")

    @flow
    def both():
        return flaky_hub(), wrong_schema(return_state=True)

    hub, bad = both()
    assert hub == "ok" and calls["hub"] == 3  # retried twice, then it worked
    assert bad.is_failed() and calls["bad"] == 1  # a deterministic failure is not retried


def test_the_sensor_records_first_then_reports_what_changed(prefect_server, world_dir, tmp_path):
    from flows.sensor import SensorParams, data_sensor_flow

    src = tmp_path / "sources"
    shutil.copytree(world_dir / "sources", src)
    params = SensorParams(sources={"llava_ov": str(src / "llava_ov"), "finevision": str(src / "finevision")},
                          watch="sensor-test")
    first = data_sensor_flow(params)
    assert first["first"] and first["changed"] == []
    again = data_sensor_flow(params)
    assert not again["first"] and again["changed"] == [] and again["digests"] == first["digests"]
    subset = sorted(p for p in (src / "finevision").iterdir() if p.is_dir())[0]
    shutil.copy(sorted(subset.glob("*.parquet"))[0], subset / "more.parquet")
    changed = data_sensor_flow(params)
    assert changed["changed"] == ["finevision"]
    with pytest.raises(ValueError, match="lowercase"):
        SensorParams(sources={}, watch="Not OK")


def test_a_whole_source_of_the_wrong_shape_is_one_clear_error_before_any_work(world_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bard_core.curation.normalise import REQUIRED
    from flows.cli import main
    from tasks.sources import check_source

    llava, fine = world_dir / "sources" / "llava_ov", world_dir / "sources" / "finevision"
    check_source("llava_ov", str(llava), REQUIRED)  # the real thing passes
    check_source("finevision", f"stream://{fine}?split=train", REQUIRED)
    text = tmp_path / "notes.parquet"
    text.write_text("id,image\n1,a.png\n")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    no_rows = tmp_path / "no_rows.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "image": pa.array([], pa.binary()),
                             "conversations": pa.array([], pa.string())}), no_rows)
    mixed = tmp_path / "mixed"
    shutil.copytree(llava, mixed / "a")
    shutil.copy(sorted(fine.rglob("*.parquet"))[0], mixed / "b.parquet")
    cases = {
        ("llava_ov", str(text)): "notes.parquet is not a readable parquet file",
        ("llava_ov", str(fine)): "not a llava_ov source: expected columns ['id', 'image', 'conversations']",
        ("finevision", str(llava)): "it looks like a llava_ov source",
        ("llava_ov", str(empty_dir)): "no parquet files under it",
        ("llava_ov", str(no_rows)): "holds no rows",
        ("llava_ov", str(mixed)): "files of different schemas in one source",
        ("llava_ov", str(tmp_path / "nope")): "no such file or directory",
    }
    for (kind, uri), message in cases.items():
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            check_source(kind, uri, REQUIRED)
    assert "it looks like a finevision source" in _error(lambda: check_source("llava_ov", str(fine), REQUIRED))
    for kind, uri in [("llava_ov", str(text)), ("llava_ov", str(fine))]:  # the command: exit 2, one line, no work
        out = tmp_path / f"out-{kind}"
        assert main(["curate", "--source", f"{kind}={uri}", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"source {kind}={uri}" in err and not out.exists()


def _error(call) -> str:
    try:
        call()
    except ValueError as exc:
        return str(exc)
    raise AssertionError("no error")
