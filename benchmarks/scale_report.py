"""Section 5, and the printed tables, of `make bench-scale` (benchmarks/scale.py): log-log growth between
the two largest sizes measured, extrapolation to the probe sizes, and the tables of WORK/scale.json or
WORK/scale_probes.json."""
from __future__ import annotations

import math

from benchmarks.etl_job import SPARK_CORES
from benchmarks.loader_pass import BATCH
from benchmarks.probes import DRIVER_STEPS, SPARK_STEPS
from benchmarks.spark_events import MEMORY_LABELS

SUPERLINEAR = 1.15
FLAG_FROM_SECONDS = 1.0  # a step shorter than this at the largest size is noise on a shared machine, not flagged


def slope(points: list[tuple[float, float]]) -> float | None:
    """Log-log slope between the two largest sizes measured (None when fewer than two, or a zero)."""
    points = sorted((x, y) for x, y in points if y is not None)
    if len(points) < 2 or points[-2][1] <= 0 or points[-1][1] <= 0:
        return None
    (x1, y1), (x2, y2) = points[-2:]
    return math.log(y2 / y1) / math.log(x2 / x1)


def extrapolate(points: list[tuple[float, float]], rows: int) -> float:
    """Fixed cost plus the marginal cost of the two largest sizes; a power law if it grows faster."""
    (x1, y1), (x2, y2) = sorted(points)[-2:]
    k = slope(points)
    if k is not None and k > SUPERLINEAR:
        return y2 * (rows / x2) ** k
    return y2 + (rows - x2) * max(y2 - y1, 0.0) / (x2 - x1)


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}" if abs(value) < 1e4 else f"{value:,.0f}"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(cell).rjust(width) if i else str(cell).ljust(width)
                        for i, (cell, width) in enumerate(zip(row, widths))))
    print()


def probe_rows(result: dict) -> list[tuple[str, dict, dict]]:
    """The driver probes' rows of the scaling table: (name, {rows: value}, options of report's add())."""
    probe_by = {probe["rows"]: probe for probe in result["probes"]}
    measure = "cpu" if all("cpu" in probe for probe in probe_by.values()) else "seconds"
    unit = ", CPU s" if measure == "cpu" else ""

    def total(probe):
        return sum(probe[measure][step] for step in DRIVER_STEPS) if set(DRIVER_STEPS) <= set(probe[measure]) else None

    rows = [(f"probe {piece}{unit}", {n: probe[measure].get(piece) for n, probe in probe_by.items()}, {})
            for piece in ("index_images", "read_csv", "parse_labels", "path_checks", "spark_start") + DRIVER_STEPS]
    rows += [
        (f"probe driver total ({' + '.join(DRIVER_STEPS)}){unit}", {n: total(p) for n, p in probe_by.items()}, {}),
        ("probe shuffle_by_patient, wall s", {n: p["seconds"].get("shuffle_by_patient") for n, p in probe_by.items()},
         {"flag": False}),
        ("probe manifest as Parquet MB", {n: p.get("manifest_parquet_mb") for n, p in probe_by.items()},
         {"seconds": False}),
    ]
    for index, name in ((0, "manifest read + shuffle write"), (-1, "shuffle by patient")):
        stages = {n: p["stages"][index] for n, p in probe_by.items() if p.get("stages")}
        rows += [(f"probe Spark stage: {name}, wall s", {n: stage["seconds"] for n, stage in stages.items()},
                  {"flag": False}),
                 ("  tasks of that stage", {n: stage["tasks"] for n, stage in stages.items()},
                  {"digits": 0, "seconds": False, "flag": False})]
    rows += [("probe driver Python peak MB", {n: p["python_peak_mb"] for n, p in probe_by.items()},
              {"digits": 0, "seconds": False}),
             ("probe driver JVMHeapMemory peak MB",
              {n: p.get("jvm_peak_mb", {}).get("JVMHeapMemory") for n, p in probe_by.items()},
              {"digits": 0, "seconds": False})]
    return rows


def probe_notes(result: dict) -> None:
    """The manifest's size on its way into Spark, the driver's peaks against its 1 GiB budgets, Spark failures."""
    from cxr_pipeline.etl.preprocess import MANIFEST_ROW_GROUP_ROWS

    probe_by = {probe["rows"]: probe for probe in sorted(result["probes"], key=lambda probe: probe["rows"])}
    parquet = [(n, p["manifest_parquet_mb"]) for n, p in probe_by.items() if p.get("manifest_parquet_mb")]
    if parquet:
        n, mb = parquet[-1]
        print(f"manifest as Parquet: {1e6 * mb / n:.0f} MB per million rows, written by the driver in row groups of "
              f"{MANIFEST_ROW_GROUP_ROWS:,} rows (one row group's Arrow copy in driver memory at a time) and read by "
              "Spark's tasks (etl/preprocess.py write_parquet)")
    for n, p in probe_by.items():
        if "spark_error" in p:
            print(f"probe at {n:,} rows: the manifest into Spark failed: {p['spark_error']}")
        else:
            print(f"probe at {n:,} rows: driver Python peak {p['python_peak_mb']:,} MB (after the manifest "
                  f"{p.get('python_after_manifest_mb', 0):,} MB), JVM heap peak "
                  f"{fmt(p.get('jvm_peak_mb', {}).get('JVMHeapMemory'), 0)} MB; budget 1,024 MB each")


def report_probes(result: dict) -> None:
    """--only probes: the driver probes' table alone (no ETL, loader or footer reads were run)."""
    probes = sorted(probe["rows"] for probe in result["probes"])
    table, flagged = [], []
    for name, measured, options in probe_rows(result):
        k = slope([(n, v) for n, v in measured.items() if v is not None])
        noise = options.get("seconds", True) and max((v or 0) for v in measured.values()) < FLAG_FROM_SECONDS
        mark = "YES" if options.get("flag", True) and k is not None and k > SUPERLINEAR and not noise else ""
        flagged += [name] if mark else []
        table.append([name] + [fmt(measured.get(n), options.get("digits", 1)) for n in probes] + [fmt(k, 2), mark])
    print(f"Driver-only probes (slope = log-log growth between the two largest sizes; CPU seconds of this process, "
          f"of the process tree with the JVM for {', '.join(SPARK_STEPS)})")
    print_table(["step (seconds unless named)"] + [f"{n:,}" for n in probes] + ["slope", f"> {SUPERLINEAR}"], table)
    probe_notes(result)
    print(f"Grows faster than linearly (slope > {SUPERLINEAR}): {', '.join(flagged) if flagged else 'nothing'}")


def report(result: dict) -> None:
    if not result["etl"]:  # --only probes
        report_probes(result)
        return
    sizes = [etl["rows"] for etl in result["etl"]]
    probes = [probe["rows"] for probe in result["probes"]]
    columns = sorted(set(sizes) | set(probes))
    header = ["step (seconds unless named)"] + [f"{n:,}" for n in columns] + ["slope", "> 1.15"]
    etl_by = {etl["rows"]: etl for etl in result["etl"]}
    table, flagged = [], []

    def add(name, measured: dict, predict: bool = False, digits: int = 1, seconds: bool = True, flag: bool = True):
        points = [(n, v) for n, v in measured.items() if v is not None]
        k = slope(points)
        noise = seconds and (not points or max(points)[1] < FLAG_FROM_SECONDS)
        cells = []
        for n in columns:
            if n in measured and measured[n] is not None:
                cells.append(fmt(measured[n], digits))
            elif predict and len(points) >= 2 and n > max(measured):
                cells.append("~" + fmt(extrapolate(points, n), digits))
            else:
                cells.append("")
        mark = "YES" if flag and k is not None and k > SUPERLINEAR and not noise else ""
        if mark:
            flagged.append(name)
        table.append([name] + cells + [fmt(k, 2), mark])

    # wall seconds of the ETL depend on what else runs on the cores: its stages are flagged on CPU seconds
    cpu_measured = all(etl_by[n].get("stage_cpu") for n in sizes)
    for stage in ("manifest", "spark_start", "decode_write", "mean_image"):
        add(f"ETL {stage}", {n: etl_by[n]["seconds"].get(stage) for n in sizes}, predict=not cpu_measured,
            flag=not cpu_measured or stage not in ("decode_write", "mean_image"))
    add("ETL other (JVM launch, read-back, commit)", {n: etl_by[n]["other"] for n in sizes}, predict=not cpu_measured)
    add("ETL spark-submit wall", {n: etl_by[n]["wall"] for n in sizes}, predict=not cpu_measured, flag=not cpu_measured)
    table.append(["ETL decode+write img/s (2 cores)"] + [fmt(n / etl_by[n]["seconds"]["decode_write"])
                                                        if n in etl_by else "" for n in columns] + ["", ""])
    table.append(["ETL whole job img/s (2 cores)"] + [fmt(n / etl_by[n]["wall"]) if n in etl_by else ""
                                                     for n in columns] + ["", ""])
    add("ETL CPU seconds, whole job (all processes)", {n: etl_by[n].get("cpu") for n in sizes}, predict=True)
    for stage in ("decode_write", "mean_image"):
        add(f"ETL CPU seconds, {stage}", {n: etl_by[n].get("stage_cpu", {}).get(stage) for n in sizes}, predict=True)
    if cpu_measured:
        table.append([f"ETL share of the {SPARK_CORES} cores it got (CPU / wall)"]
                     + [f"{100 * etl_by[n]['cpu'] / etl_by[n]['wall'] / SPARK_CORES:.0f}%" if n in etl_by else ""
                        for n in columns] + ["", ""])
        cpu_points = sorted((n, etl_by[n]["cpu"]) for n in sizes)
        table.append([f"ETL wall on {SPARK_CORES} free cores, predicted (CPU / {SPARK_CORES})"]
                     + ["~" + fmt(extrapolate(cpu_points, n) / SPARK_CORES) if n > max(sizes) else ""
                        for n in columns] + ["", ""])
    add("ETL driver Python peak MB", {n: etl_by[n]["driver_python_peak_mb"] for n in sizes}, digits=0, seconds=False)
    for metric, label in MEMORY_LABELS.items():
        add(f"ETL {label}, peak MB", {n: etl_by[n]["executor_peak_mb"].get(metric) for n in sizes}, digits=0,
            seconds=False)
    for name, measured, options in probe_rows(result):
        add(name, measured, **options)
    footers = {f["rows"]: f for f in result["footers"]}
    add("files written (all splits)", {n: f["files"] for n, f in footers.items()}, digits=0, seconds=False)
    for piece in ("split_row_count", "written_rows", "loader_index"):
        if all("cpu" in f for f in footers.values()):
            add(f"footers {piece}, CPU s", {n: f["cpu"][piece] for n, f in footers.items()}, digits=2)
        else:
            add(f"footers {piece}", {n: f["seconds"][piece] for n, f in footers.items()}, digits=2)
    print(f"ETL stages at {max(sizes):,} rows (local[{SPARK_CORES}])")
    big = etl_by[max(sizes)]
    written = sum(big["rows_written"].values())
    stages = [("manifest", max(sizes)), ("spark_start", None), ("decode_write", max(sizes)),
              ("mean_image", big["rows_written"]["train"])]
    print_table(["stage", "seconds", "images/s", "share of wall"],
                [[stage, fmt(big["seconds"].get(stage)),
                  fmt(n / big["seconds"][stage]) if n and big["seconds"].get(stage) else "-",
                  f"{100 * big['seconds'].get(stage, 0) / big['wall']:.0f}%"] for stage, n in stages]
                + [["other (JVM launch, read-back, commit)", fmt(big["other"]), "-",
                    f"{100 * big['other'] / big['wall']:.0f}%"],
                   ["spark-submit wall", fmt(big["wall"]), fmt(written / big["wall"]), "100%"]])
    print("Scaling (measured; ~ = extrapolated from the two largest measured sizes; slope = log-log growth "
          "between them; flags and predictions rest on CPU seconds where wall time depends on what else ran)")
    print_table(header, table)
    if cpu_measured:
        (x1, y1), (x2, y2) = sorted((n, etl_by[n]["stage_cpu"]["decode_write"]) for n in sizes)[-2:]
        per_image = (y2 - y1) / (x2 - x1)
        print(f"decode+write, marginal CPU: {1000 * per_image:.1f} ms per image ({1 / per_image:.1f} img/s per core)")
    if all("cpu" in etl_by[n] for n in sizes[-2:]):
        (x1, c1), (x2, c2) = sorted((n, etl_by[n]["cpu"]) for n in sizes)[-2:]
        per_image_cpu = (c2 - c1) / (x2 - x1)
        print(f"whole ETL job, marginal CPU: {1000 * per_image_cpu:.1f} ms per image (all processes; "
              f"{1 / per_image_cpu:.1f} img/s per core when the job has the core to itself); "
              f"{', '.join(f'{n:,} images = {n * per_image_cpu / 3600:.1f} CPU-hours' for n in (112_120, 1_000_000))}")
    probe_notes(result)
    print()

    largest = max(sizes)
    print(f"Parquet layout of the {largest:,}-row dataset (from the footers)")
    layout = result["layout"][largest]
    print_table(["split", "rows", "files", "row groups", "rows/row group min/med/max", "MB/file min/med/max"],
                [[split, f"{v['rows']:,}", v["files"], v["row_groups"],
                  "/".join(fmt(v["rows_per_row_group"].get(k), 0) for k in ("min", "median", "max")),
                  "/".join(fmt(v["mb_per_file"].get(k)) for k in ("min", "median", "max"))]
                 for split, v in layout.items()])

    print(f"Loader: one pass of split=train ({largest:,}-row dataset), batch {BATCH}, shuffled and padded to full "
          "batches as training reads it, one process per rank")
    rows = []
    for run in result["loader"]:
        for r in run["ranks"]:
            rows.append([f"{run['world']} ranks", r["rank"], f"{r['rows']:,}", r["files"], r["row_groups"],
                         r["full_batches"], fmt(r["first_batch_s"], 2), fmt(r["seconds"]), fmt(r["rows_per_s"], 0),
                         fmt(r["rows"] / r["cpu"], 0) if r.get("cpu") else "-", r["peak_rss_mb"]])
        rows.append([f"{run['world']} ranks", "all", f"{sum(r['rows'] for r in run['ranks']):,}",
                     sum(r["files"] for r in run["ranks"]), sum(r["row_groups"] for r in run["ranks"]),
                     sum(r["full_batches"] for r in run["ranks"]), "", fmt(run["wall"]), fmt(run["rows_per_s"], 0),
                     fmt(sum(r["rows"] for r in run["ranks"]) / sum(r["cpu"] for r in run["ranks"]), 0)
                     if run["ranks"][0].get("cpu") else "-", ""])
    print_table(["run", "rank", "rows", "files", "row groups", "full batches", "1st batch s", "pass s", "rows/s",
                 "rows/CPU-s", "peak RSS MB"], rows)

    for run in result["loader"]:
        rows_per_rank = [r["rows"] for r in run["ranks"]]
        print(f"{run['world']} ranks: {run['steps']} steps on every rank; rows per rank "
              f"{min(rows_per_rank)}-{max(rows_per_rank)} (train's row groups hold "
              f"{layout['train']['rows_per_row_group']['min']}-{layout['train']['rows_per_row_group']['max']} rows); "
              f"of {run['train_rows']:,} train rows {run['unread']} unread, {run['repeated']} read twice to fill "
              "the last batches" + (f"; load average {run['load']:.1f} during the pass" if run.get("load") else ""))
    print()
    print(f"Grows faster than linearly (slope > {SUPERLINEAR}): {', '.join(flagged) if flagged else 'nothing'}")
    print(f"Total wall time of this benchmark: {result['total_seconds'] / 60:.1f} min "
          f"(load average over its last 15 min {result['load_average_15min']:.1f} on {result['cores']} cores: "
          "other work on this machine shares them)")
