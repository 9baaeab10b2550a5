"""One training pass over split=train as train_one_epoch reads it, run by each rank under horovodrun:
rank 0 writes every rank's image ids and batch count to the JSON file named by argv[2].

    horovodrun -np N python tests/rank_epoch.py DATASET OUT.json [--oversample F]
"""
import json
import sys

from cxr_pipeline.schema import read_dataset_spec
from cxr_pipeline.training.data.reader import SplitReader, label_table, prefetch
from cxr_pipeline.training.data.sampling import Oversampler
from cxr_pipeline.training.loop import distributed

BATCH = 4


def main(dataset: str, out: str, oversample: float = 0.0) -> None:
    dist = distributed.detect("horovod")
    spec = read_dataset_spec(dataset)
    sampler = None
    if oversample:
        sampler = Oversampler(*label_table(dataset, "train", spec), list(range(spec.num_labels)), oversample)
    reader = SplitReader(dataset, "train", spec, BATCH, dist.rank, dist.size, shuffle=True, seed=5,
                         full_batches=True, oversampler=sampler)
    batches = [batch.image_ids for batch in prefetch(reader)]
    shares = dist.allgather_object({"rank": dist.rank, "batches": batches, "planned": len(reader),
                                    "padding": reader.shard.padding, "pass_rows": reader.shard.pass_rows})
    if dist.is_main:
        with open(out, "w") as handle:
            json.dump(shares, handle)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
