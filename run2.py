import json
import sys
import time

from cellmorph.config import load_config
from cellmorph.launch import resolve_paths
from cellmorph.train import run_local

name = sys.argv[1]
cfg = resolve_paths(
    load_config(
        None,
        [
            f"name={name}",
            "run_root=/work/exp/runs",
            "data.store=/work/exp/s128.zarr",
            *sys.argv[2:],
        ],
    )
)
t = time.time()
run = run_local(cfg)
h = run.history()
r = run.read_result()


def g(d, k):
    return None if d is None or k not in d else round(d[k], 3)


prof = r.get("profiling") or {}
print(
    json.dumps(
        {
            "name": name,
            "overrides": sys.argv[2:],
            "minutes": round((time.time() - t) / 60, 2),
            "epochs": len(h),
            "val_bal_by_epoch": [round(x["balanced_accuracy"], 3) for x in h],
            "fold": r["fold"],
            "bal": g(r, "balanced_accuracy"),
            "well_bal": g(r, "well_balanced_accuracy"),
            "acc": g(r, "accuracy"),
            "val_bal": g(r.get("validation"), "balanced_accuracy"),
            "map": g(prof.get("embeddings"), "mean_map"),
            "map_int": g(prof.get("intensity_baseline"), "mean_map"),
            "retrieved": g(prof.get("embeddings"), "fraction_retrieved"),
        }
    ),
    flush=True,
)
