"""Do the heatmaps point at the lesion? The pointing game on NIH's bounding boxes.

For every image of the dataset that `BBox_List_2017.csv` boxes (the ETL keeps them in
DATASET/_side/bounding_boxes.parquet when the file is in the data root) and every boxed finding
the model knows, compute the class heatmap and check whether its peak lies inside the box,
scaled from the 1024 px original to the stored size. Prints the hit rate per label and writes
each overlay with its box drawn.

    python -m training.localisation --checkpoint RUN/best_finetune.pth --dataset /data/nih_224 \\
        --overlay-dir outputs/localisation
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from cxr_pipeline.etl import versions
from cxr_pipeline.schema import read_dataset_spec, split_dir
from cxr_pipeline.training.data.inputs import stored_pixels
from cxr_pipeline.training.data.reader import METADATA_COLUMNS
from cxr_pipeline.training.explain import overlays
from cxr_pipeline.training.explain.gradcam import peak_inside
from cxr_pipeline.training.models.fusion import metadata_features
from cxr_pipeline.training.models.registry import uses_metadata
from cxr_pipeline.training.serving.scorer import load

NIH_ORIGINAL_SIZE = 1024
BOXES = Path("_side") / "bounding_boxes.parquet"


def boxed_rows(dataset: Path, boxes: pd.DataFrame) -> pd.DataFrame:
    """Dataset rows (any split) of the boxed images, with their stored pixels."""
    columns = ["image_id", "pixels_u8", *METADATA_COLUMNS]
    frames = [pq.read_table(split_dir(dataset, split), columns=columns,
                            filters=[("image_id", "in", sorted(set(boxes["image_id"])))]).to_pandas().assign(split=split)
              for split in ("train", "val", "test") if split_dir(dataset, split).exists()]
    return pd.concat(frames, ignore_index=True).set_index("image_id")


def pointing_game(checkpoint: str, dataset: Path, overlay_dir: Path | None = None) -> pd.DataFrame:
    scorer = load(checkpoint)
    trained_on = scorer.spec
    spec = read_dataset_spec(dataset)
    if spec.pixel_dtype != "uint8" or trained_on.label_names != spec.label_names:
        raise SystemExit(f"{dataset} must be a uint8 dataset with the labels {checkpoint} was trained on")
    if not (dataset / BOXES).exists():
        raise SystemExit(f"{dataset / BOXES} not found: put BBox_List_2017.csv in the ETL's --data-root and rerun it")
    boxes = pd.read_parquet(dataset / BOXES)
    boxes = boxes[boxes["label"].isin(spec.label_names)]
    rows = boxed_rows(dataset, boxes)
    boxes = boxes[boxes["image_id"].isin(rows.index)]
    scale = spec.image_size / NIH_ORIGINAL_SIZE
    results = []
    for box in boxes.itertuples():
        row = rows.loc[box.image_id]
        grey = np.frombuffer(row["pixels_u8"], dtype=np.uint8).reshape(spec.image_size, spec.image_size)
        extra = (metadata_features(*([row[c]] for c in METADATA_COLUMNS)),) if uses_metadata(scorer.model_name) else ()
        label_index = spec.label_names.index(box.label)
        heatmap = overlays.scorer_heatmap(scorer, stored_pixels(grey), label_index, extra_inputs=extra)
        scaled = (box.x * scale, box.y * scale, box.width * scale, box.height * scale)
        results.append({"image_id": box.image_id, "label": box.label, "split": row["split"],
                        "hit": peak_inside(heatmap, scaled), "box": scaled})
        if overlay_dir is not None:  # the overlay is upscaled to be read: draw scales the stored-pixel box with it
            probability = scorer.probabilities(stored_pixels(grey), extra)[0][label_index]
            overlay_dir.mkdir(parents=True, exist_ok=True)
            overlays.draw(grey, heatmap, box.label, probability, box=scaled).save(
                overlay_dir / overlays.file_name(box.image_id, box.label))
    return pd.DataFrame(results, columns=["image_id", "label", "split", "hit", "box"])


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="RUN_DIR/best_<stage>.pth from train.py")
    parser.add_argument("--dataset", required=True, help="NIH dataset written by etl/preprocess.py (with _side/)")
    parser.add_argument("--overlay-dir", help="write each heatmap with its box drawn here")
    args = parser.parse_args(argv)
    results = pointing_game(args.checkpoint, versions.resolve(args.dataset).path,
                            Path(args.overlay_dir) if args.overlay_dir else None)
    print(f"pointing game: heatmap peak inside the box for {int(results['hit'].sum())} of {len(results)} boxes")
    for label, hits in results.groupby("label")["hit"]:
        print(f"  {label:<20} {int(hits.sum())}/{len(hits)}")
    return results


if __name__ == "__main__":
    main()
