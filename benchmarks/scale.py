"""`make bench-scale`: the pipeline at 20,000 NIH-sized images, and the steps that grow faster than the data.

    python -m benchmarks.scale [--sizes 2500,5000,20000] [--probe-rows 20000,112120,1000000]
                               [--ranks 2,4] [--work /tmp/cxr-bench-scale]
    python -m benchmarks.scale --only probes [--probe-rows 112120,1000000]   # section 4's driver probes alone

1. ETL: the real 1024 px NIH PNGs repeated to each of --sizes rows (benchmarks/nih_repeat.py, the full
   Data_Entry table's labels and patients), etl/preprocess.py to 512 px on local[2] with a Spark event
   log. Per stage (the job's `_etl_summary.json` seconds, the rest of
   spark-submit's wall time as "other"): wall seconds and images/s, and the CPU seconds of the job's
   process tree (read from /proc each second: other work on a shared machine changes wall time, not
   these); peak memory of the driver Python (the summary) and of the JVM and Python processes (the event
   log's executor metrics: in local mode the executor is the driver JVM, and its Python process tree
   holds the driver Python and the Python workers).
2. Files: Parquet files, row groups, rows per row group and bytes per file per split (footers).
3. Loader: one pass of split=train of the largest dataset with 2 and with 4 ranks (one process each,
   started together), batch 32, shuffled and padded to full batches as training reads it: rows, files and
   full batches per rank, the train rows no rank read and the rows read more than once (the multiset of
   image ids all ranks yielded), rows/s.
4. Driver-only probes, no pixels decoded, at --probe-rows: the NIH manifest (os.walk of a folder of
   symlinks, the label parsing, the path checks), splits, the patient check, the manifest into Spark as
   the ETL moves it (written to Parquet by the driver, read by Spark) and its shuffle by patient (a no-op
   write), the driver's Python and JVM heap peaks; footer reads of a dataset of as many files as the ETL
   would write (hard links to one real file: page cache, no network), and the image_id column of every train
   file that each loader rank reads once to plan its share. `--only probes` runs these probes
   and nothing else (no ETL, loader or footer reads; table in WORK/scale_probes.json).
5. Growth: the log-log slope of each step's seconds (CPU seconds where measured) and of peak memory
   between the two largest sizes measured, flagged above 1.15; the ETL's CPU seconds extrapolated to
   the probe sizes (fixed cost plus the marginal cost of the two largest sizes; a power law where the
   slope is above 1.15).

The table is printed at the end and written to WORK/scale.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from benchmarks.etl_job import ROOT, SIZE, SPARK_CORES, file_layout, spark_etl
from benchmarks.loader_pass import loader_pass
from benchmarks.nih_repeat import build
from benchmarks.probes import files_written, footer_probe, run_driver_probe
from benchmarks.scale_report import report
from cxr_pipeline.etl import versions

# sections 1-2 run in benchmarks/etl_job.py, 3 in loader_pass.py, 4 in probes.py, 5 and the tables in scale_report.py;
# sampler.py and spark_events.py measure them
NIH = Path(os.environ.get("CXR_SHARED_DATA", ROOT.parent / "shared" / "data")) / "nih"


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def timed(timings: dict, name: str, function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    timings[name] = time.perf_counter() - started
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2500,5000,20000", help="rows of the ETL runs (default 2500,5000,20000)")
    parser.add_argument("--probe-rows", default="20000,112120,1000000",
                        help="rows of the driver-only probes (default 20000,112120,1000000)")
    parser.add_argument("--ranks", default="2,4", help="loader world sizes (default 2,4)")
    parser.add_argument("--work", default="/tmp/cxr-bench-scale", help="scratch folder (default /tmp/cxr-bench-scale)")
    parser.add_argument("--print-only", action="store_true", help="print the table of WORK/scale.json again")
    parser.add_argument("--only", choices=("probes",),
                        help="probes: only the driver-only probes at --probe-rows (section 4, no ETL, loader or "
                             "footer reads; WORK/scale_probes.json)")
    args = parser.parse_args(argv)
    saved = Path(args.work) / ("scale_probes.json" if args.only else "scale.json")
    if args.print_only:
        report(json.loads(saved.read_text(), object_hook=_int_keys))
        return
    if not (NIH / "images").exists() or not (NIH / "Data_Entry_2017_v2020.csv.gz").exists():
        raise SystemExit(f"real NIH images or Data_Entry_2017_v2020.csv.gz not found in {NIH}; "
                         "set CXR_SHARED_DATA to the shared/data folder")
    sizes = [] if args.only == "probes" else sorted(int(n) for n in args.sizes.split(","))
    probe_rows = sorted(int(n) for n in args.probe_rows.split(","))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict = {"sizes": sizes,
                    "probe_rows": probe_rows, "cores": os.cpu_count(), "etl": [], "layout": {},
                    "loader": [], "probes": [], "footers": [], "build_seconds": {}}

    for rows in sizes:
        progress(f"data root of {rows:,} rows (symlinks to the real PNGs)...")
        root = timed(result["build_seconds"], rows, build, NIH, work / f"nih_{rows}", rows, full_table=True)
        progress(f"ETL of {rows:,} rows to {SIZE} px on local[{SPARK_CORES}]...")
        etl = spark_etl(root, work / f"nih_{rows}_{SIZE}", work, rows)
        if "error" in etl:
            raise SystemExit(f"the ETL of {rows} rows failed: {etl['error']}; its log: {etl['log']}")
        result["etl"].append(etl)
        result["layout"][rows] = file_layout(versions.resolve(work / f"nih_{rows}_{SIZE}").path)
        progress(f"  {etl['wall']:.0f} s wall, decode+write {etl['seconds']['decode_write']:.1f} s "
                 f"({rows / etl['seconds']['decode_write']:.1f} img/s), stages {fmt_seconds(etl['seconds'])}, "
                 f"driver Python {etl['driver_python_peak_mb']:.0f} MB, JVM {etl['executor_peak_mb']}")
        if rows != sizes[-1]:  # only the largest is read again (loader, footer template)
            shutil.rmtree(work / f"nih_{rows}_{SIZE}")

    dataset = versions.resolve(work / f"nih_{sizes[-1]}_{SIZE}").path if sizes else None
    for world in (int(n) for n in args.ranks.split(",")) if sizes else ():
        progress(f"loader: one pass of split=train with {world} ranks...")
        run = loader_pass(dataset, world, result["layout"][sizes[-1]]["train"]["rows"])
        result["loader"].append(run)
        progress(f"  steps {run['steps']}, rows/s {run['rows_per_s']:.0f}, rows per rank "
                 f"{[r['rows'] for r in run['ranks']]}, row groups {[r['row_groups'] for r in run['ranks']]}")

    layout = result["layout"][sizes[-1]] if sizes else None
    for rows in probe_rows:
        root = work / f"nih_{rows}"
        if not (root / "Data_Entry_2017.csv").exists() or rows not in sizes:
            progress(f"probe data root of {rows:,} rows (labels and symlinks only)...")
            timed(result["build_seconds"], rows, build, NIH, root, rows, full_table=True)
        progress(f"driver probe at {rows:,} rows: manifest, splits, manifest into Spark (no decoding)...")
        probe = run_driver_probe(root, rows, work)
        result["probes"].append(probe)
        progress(f"  {fmt_seconds(probe['seconds'])}, driver Python peak {probe['python_peak_mb']} MB"
                 + (f", Spark failed: {probe['spark_error']}" if "spark_error" in probe else ""))
        if sizes:  # the footer probe copies a file of the largest ETL dataset
            files = files_written(rows, layout, sizes[-1])
            progress(f"footer probe: {sum(files.values()):,} files ({files})...")
            footers = footer_probe(dataset, files, work)
            result["footers"].append({"rows": rows, **footers})
            progress(f"  {fmt_seconds(footers['seconds'])}")
        if rows not in sizes:
            shutil.rmtree(root)  # up to a million symlinks: not kept

    result["total_seconds"] = time.perf_counter() - started
    result["load_average_15min"] = os.getloadavg()[2]
    saved.write_text(json.dumps(result, indent=2, default=str))
    print()
    report(result)
    print(f"(JSON: {saved})")


def _int_keys(mapping: dict) -> dict:
    return {int(key) if key.isdigit() else key: value for key, value in mapping.items()}


def fmt_seconds(seconds: dict) -> str:
    return ", ".join(f"{name} {value:.2f}" for name, value in seconds.items())


if __name__ == "__main__":
    main()
