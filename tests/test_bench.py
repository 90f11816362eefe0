"""Every script under bench/ runs on today's code: each is run as a process at a tiny size, and
prints its JSON with the keys docs/benchmarks.md quotes (issue 21: the loader's figures could
not be reproduced once bench/loader.py had rotted).

bench/gpu_check.py is run the same way by tests/test_gpu_kit.py
(``test_gpu_check_full_runs_end_to_end_on_the_cpu``: ``--cpu-smoke``, every section with DALI
and Ray): not repeated here. ``test_every_bench_script_has_a_smoke_test``
keeps this list complete.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cellmorph.config import LoaderConfig, default_image_size

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
# Scripts smoke-tested elsewhere, and where.
ELSEWHERE = {"gpu_check.py": "tests/test_gpu_kit.py"}


def run_bench(script: str, *args: str, cwd: Path, timeout: float = 300,
              ray_address: str | None = None) -> dict:  # fmt: skip
    """Run ``bench/<script>`` as a user does; its stdout is one JSON object. ``ray_address``:
    its Ray runs join that cluster (as inside ``ray job submit``) instead of starting one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    # One intra-op thread: the smoke runs check the code paths, not the rates, and two threads
    # on a shared 2-core machine can stall a step for seconds.
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:  # accuracy.py: the training run's lines, then one JSON line
        return json.loads(proc.stdout.strip().splitlines()[-1])


def has(d: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in d]
    assert not missing, f"missing {missing} in {sorted(d)}"


def test_every_bench_script_has_a_smoke_test():
    source = Path(__file__).read_text()
    for script in sorted(BENCH.glob("*.py")):
        where = ELSEWHERE.get(script.name)
        if where:
            assert f"bench/{script.name}" in (ROOT / where).read_text()
        else:
            assert f'run_bench("{script.name}"' in source, f"no smoke test for {script.name}"


def test_index(tmp_path):
    r = run_bench("index.py", "--rows", "20000", "--naive", cwd=tmp_path)
    has(r, "rows", "plates", "wells", "classes", "seconds", "traced_peak_mb", "peak_rss_mb",
        "rss_after_table_mb", "train", "val", "train_order", "val_wells_in_train",
        "epoch_indices_s", "groupby_baseline_s", "ratio_to_groupby", "goal", "sklearn_rows_s",
        "speedup_vs_sklearn_rows")  # fmt: skip
    assert r["val_wells_in_train"] == 0 and r["train"] > 0 and r["val"] > 0


@pytest.mark.slow
def test_loader(tmp_path):
    """The full run (every path, store built with the statistics normalization needs); the
    ``--read-only`` run is its read-path part (``bench_read``) alone."""
    r = run_bench("loader.py", "--sites", "8", "--tiff-size", "64", "--batch", "4",
                  "--workers", "1", "--seconds", "0", "--rounds", "1", "--dir", str(tmp_path),
                  cwd=tmp_path)  # fmt: skip
    has(r, "machine", "sites", "store", "workers", "a_original", "b_torch", "c_dali_cpu",
        "d_read", "d_read_unchecked", "verify_cost", "e_decode", "e_decode_1thread",
        "crc32c_1thread", "crc_vs_decode", "zarr_rows", "train_cpu", "g_dali_gpu",
        "store_vs_original", "read_vs_decode", "loader_vs_train_cpu", "prep_s", "total_s")  # fmt: skip
    assert r["sites"] == 8 and r["b_torch"] > 0 and r["c_dali_cpu"] > 0


def test_loader_cells(tmp_path):
    """``--crop-size``: a cell store converted from the real site, the image size resolved from
    it, the ratio to CPU training at that size; the field-only paths are null."""
    r = run_bench("loader.py", "--crop-size", "32", "--sites", "1", "--batch", "4",
                  "--workers", "1", "--seconds", "0", "--rounds", "1", "--dir", str(tmp_path),
                  cwd=tmp_path)  # fmt: skip
    has(r, "machine", "sites", "store", "image_size", "batch", "workers", "load_average",
        "b_torch", "c_dali_cpu", "train_cpu", "d_read", "e_decode", "read_vs_decode",
        "loader_vs_train_cpu", "prep_s", "total_s")  # fmt: skip
    assert r["store"].startswith("109 crops of 32 px")
    assert r["image_size"] == default_image_size(32, LoaderConfig().view_fraction)
    assert r["a_original"] is None and r["store_vs_original"] is None and r["g_dali_gpu"] is None
    best = max(r["b_torch"], r["c_dali_cpu"])
    assert r["train_cpu"] > 0 and r["loader_vs_train_cpu"] == pytest.approx(
        best / r["train_cpu"], rel=0.02
    )


@pytest.mark.slow
def test_convert(tmp_path):
    r = run_bench("convert.py", "--sites", "8", "--image-size", "64", "--size", "32",
                  "--workers", "2", "--shard-size", "4", "--rounds", "1", "--data",
                  str(tmp_path), cwd=tmp_path)  # fmt: skip
    has(r, "machine", "sites", "store_size", "input_mb", "images_per_s", "convert_1_vs_baseline",
        "pack_1_vs_baseline", "convert_2_vs_baseline", "speedup_2_vs_1_workers",
        "pack_speedup_2_vs_1_workers", "load_average", "all_seconds", "store")  # fmt: skip
    assert set(r["images_per_s"]) == {"baseline", "convert_1", "convert_2", "pack_1", "pack_2"}
    has(r["store"], "bytes_per_image", "compression_ratio", "files_for_10000", "bytes_for_10000")
    assert r["sites"] == 8 and r["store"]["measured_images"] == 8


def test_convert_cells(tmp_path):
    r = run_bench("convert_cells.py", "--sites", "2", "--crop-size", "32", "--rounds", "1",
                  "--data", str(tmp_path), cwd=tmp_path)  # fmt: skip
    has(r, "machine", "sites", "cells", "crop_size", "codec", "crops_per_s", "convert_vs_decode",
        "pack_vs_decode", "load_average", "all_seconds")  # fmt: skip
    assert set(r["crops_per_s"]) == {"decode", "convert", "pack"}
    assert r["cells"] == 2 * 109 and r["pack_vs_decode"] > 0
    assert r["cpu_convert_vs_decode"] > 0
    assert set(r["cpu_seconds"]) == {"decode", "convert", "own_decode"}
    assert r["own_decode"]["convert_vs_it"] > 0 and r["store"]["bytes_per_crop"] > 0
    assert (r["store"]["codec"], r["store"]["codec_level"]) == ("blosc-lz4", None)  # auto, cells


@pytest.mark.slow
def test_train(tmp_path):
    """Both loaders, 0 and 1 workers, model-only baseline; one timed step each."""
    r = run_bench("train.py", "--images", "160", "--store-size", "32", "--image-size", "32",
                  "--batch-size", "4", "--steps", "1", "--warmup", "1", "--rounds", "1",
                  "--width-mult", "0.25", "--workers", "0,1", "--device", "cpu",
                  "--dir", str(tmp_path), cwd=tmp_path)  # fmt: skip
    has(r, "device", "batch_size", "image_size", "store", "amp", "channels_last", "steps",
        "warmup_steps", "rounds", "model_only_img_s", "model_only_by_threads_img_s",
        "end_to_end_img_s", "ratio", "best_loader", "meets_ratio_goal", "all_rounds_img_s",
        "prep_s", "total_s")  # fmt: skip
    assert r["errors"] == {}, r["errors"]
    assert {"torch_w0", "torch_w1", "dali_w1"} <= set(r["ratio"])
    assert r["model_only_img_s"] > 0 and all(v > 0 for v in r["end_to_end_img_s"].values())


def test_objectstore(tmp_path):
    exe = Path(os.environ.get("CELLMORPH_SERVERS_VENV", ROOT / ".venv-servers")) / "bin"
    if not (exe / "moto_server").exists():
        pytest.skip(f"{exe / 'moto_server'} is missing: run `make servers`")
    r = run_bench("objectstore.py", "--images", "64", "--batch", "16", "--passes", "1",
                  cwd=tmp_path)  # fmt: skip
    has(r, "images", "batch", "reader_threads", "store_mib", "img_per_s", "s3_vs_local",
        "warm_cache_vs_local", "cold_cache_vs_local", "fetched_bytes_cold_and_warm_pass")  # fmt: skip
    assert set(r["img_per_s"]) == {"local", "s3", "s3_cache_cold", "s3_cache_warm"}
    assert r["fetched_bytes_cold_and_warm_pass"] > 0


@pytest.mark.slow
def test_accuracy(tmp_path):
    r = run_bench("accuracy.py", "--plates", "2", "--rows", "3", "--cols", "5", "--render",
                  "48", "--size", "32", "--smoke", "--work", str(tmp_path), cwd=tmp_path)  # fmt: skip
    has(r, "plate", "split", "budget_s", "cellmorph", "study", "delta_balanced_accuracy",
        "goal_met", "throughput", "machine")  # fmt: skip
    for side in ("cellmorph", "study"):
        has(r[side], "balanced_accuracy", "accuracy", "well_balanced_accuracy", "macro_f1",
            "epochs")  # fmt: skip
    has(r["throughput"], "cellmorph_train_img_s", "plain_in_memory_img_s", "ratio")
    assert r["split"]["fold_scored"] == "test" and r["plate"]["images"] == 120


@pytest.fixture(scope="module")
def scale_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One work folder: the store built by the first scale run is reused by the second."""
    return tmp_path_factory.mktemp("scale")


def run_scale(work: Path, stages: list[str], timeout: float = 300,
              ray_address: str | None = None) -> dict:  # fmt: skip
    # 10,000 sites: the smallest N whose plates hold two plate types (two classes)
    r = run_bench("scale.py", "--images", "10000", "--work", str(work), "--steps", "2",
                  "--stages", ",".join(stages), cwd=work, timeout=timeout,
                  ray_address=ray_address)  # fmt: skip
    assert list(r["stages"]) == stages
    failed = {k: v for k, v in r["stages"].items() if "failed" in v}
    assert not failed, failed
    for stage in r["stages"].values():
        has(stage, "seconds", "peak_rss_mb", "peak_anon_mb")
    return r


@pytest.mark.slow
def test_scale_planning_and_reading(scale_work):
    """The stages without Ray, each in its own process."""
    r = run_scale(scale_work, ["convert_plan", "open_store", "index"])
    assert r["stages"]["convert_plan"]["sites"] == 10000 and r["stages"]["index"]["classes"] == 2
    has(r["stages"]["open_store"], "training_columns_s", "all_columns_s", "columns")


@pytest.mark.slow
def test_scale_cells(tmp_path):
    """The cells rehearsal: a cell store of 100,000 cells (~800 sites) converted, opened,
    indexed and planned, each stage in its own process (the compound as label: these few
    plates have one plate type)."""
    n = 100_000
    r = run_bench("scale.py", "--cells", str(n), "--work", str(tmp_path),
                  "--label-column", "Metadata_JCP2022", cwd=tmp_path)  # fmt: skip
    assert list(r["stages"]) == ["convert_cells", "open_store", "index", "plan"]
    for stage in r["stages"].values():
        assert "failed" not in stage, stage
        has(stage, "seconds", "peak_rss_mb", "peak_anon_mb")
    convert, index = r["stages"]["convert_cells"], r["stages"]["index"]
    assert r["cells"] == convert["cells"] == r["inputs"]["locations_rows"] == n
    assert convert["sites"] + convert["sites_without_cells"] == r["inputs"]["sites"]
    assert convert["shards"] == -(-n // 4096) and index["classes"] >= 2
    assert index["train"] + index["val"] + index["test"] == n
    plan = r["stages"]["plan"]
    assert plan["epoch_entries"] == index["train_order"] >= index["train"]
    # rank 0 of 8: an eighth of the epoch, padded to whole batches on every rank
    step = plan["world_size"] * plan["batch_size"]
    assert plan["rank_batches"] == -(-plan["epoch_entries"] // step)
    has(r["bytes_per_cell"], "metadata", "manifest", "pixels_96px_from_sizing_md")
    assert r["bytes_per_cell"]["metadata"] == pytest.approx(convert["metadata_bytes"] / n, abs=0.01)


@pytest.mark.slow
@pytest.mark.ray
def test_scale_training_report_predict(scale_work, ray_cluster):
    """``train`` on 2 Ray workers (the session's cluster: one per node), 2 steps; report and
    predict read its run."""
    r = run_scale(scale_work, ["train", "report", "predict"], timeout=500,
                  ray_address=ray_cluster.address)  # fmt: skip
    has(r["stages"]["train"], "epoch_s", "train_steps_s", "validation_s", "finish_s",
        "val_images", "test_images")  # fmt: skip
    assert r["stages"]["predict"]["images"] == 10000 and r["per_worker_peak_rss_mb"] > 0
    assert {"predictions.parquet", "embeddings.npy", "wells.parquet"} <= set(
        r["stages"]["predict"]["bytes"]
    )
