"""CheXpert uncertainty policies, on hand-made values and on the real 223,414-row label table,
and the dataset spec fields that record them."""
import json

import numpy as np
import pandas as pd
import pytest

from conftest import CHEXPERT_TRAIN_CSV, require
from cxr_pipeline.etl.sources.chexpert import LABEL_NAMES
from cxr_pipeline.etl.uncertainty import apply_policy, parse_policies, relabel_uncertain
from cxr_pipeline.schema import DatasetSpec, metadata_columns

NAN = float("nan")


@pytest.fixture(scope="module")
def real_raw():
    """The real table's observation columns as numbers (blank -> NaN), read with plain pandas."""
    table = pd.read_csv(require(CHEXPERT_TRAIN_CSV), usecols=list(LABEL_NAMES))[list(LABEL_NAMES)]
    return table.to_numpy(dtype=np.float64)


def test_policy_text_all_labels_per_label_and_mapping():
    names = ["Atelectasis", "Cardiomegaly", "Edema"]
    assert parse_policies("u-ones", names) == ("U-Ones",) * 3
    assert parse_policies(None, names) == ("U-Zeros",) * 3
    assert parse_policies("U-Ignore,Atelectasis=U-Ones, Cardiomegaly=U-MultiClass", names) == (
        "U-Ones", "U-MultiClass", "U-Ignore")
    assert parse_policies({"default": "U-Zeros", "Edema": "U-SelfTrained"}, names) == (
        "U-Zeros", "U-Zeros", "U-SelfTrained")


@pytest.mark.parametrize("text, message", [
    ("U-Maybe", "unknown uncertainty policy 'U-Maybe'"),
    ("Atelectasiss=U-Ones", "unknown labels \\['Atelectasiss'\\]"),
    ("Edema=U-Ones,Edema=U-Zeros", "given twice for 'Edema'"),
])
def test_bad_policy_text_says_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        parse_policies(text, ["Atelectasis", "Edema"])


def test_each_policy_on_hand_made_values():
    raw = np.array([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [-1, -1, -1, -1, -1], [NAN] * 5])
    labels, mask = apply_policy(raw, ["U-Zeros", "U-Ones", "U-Ignore", "U-MultiClass", "U-SelfTrained"])
    assert labels.T.tolist() == [[1, 0, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0], [2, 0, 1, 0], [1, 0, 0, 0]]
    assert mask.T.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 1, 1], [1, 1, 0, 1]]
    _, mask_blank_ignored = apply_policy(raw, ["U-Zeros"] * 5, blank="U-Ignore")
    assert mask_blank_ignored[3].tolist() == [0] * 5 and mask_blank_ignored[:3].min() == 1


def test_values_other_than_one_zero_minus_one_blank_are_refused():
    with pytest.raises(ValueError, match="must be 1, 0, -1 or blank, found \\[2.0\\]"):
        apply_policy(np.array([[2.0]]), ["U-Zeros"])


@pytest.mark.parametrize("policy", ["U-Zeros", "U-Ones", "U-Ignore", "U-MultiClass", "U-SelfTrained"])
def test_policy_for_all_labels_on_the_real_table(real_raw, policy):
    labels, mask = apply_policy(real_raw, [policy] * len(LABEL_NAMES))
    positives, uncertain = (real_raw == 1).sum(axis=0), (real_raw == -1).sum(axis=0)
    assert len(labels) == 223_414 and np.isfinite(labels).all()
    expected_sum = {"U-Zeros": positives, "U-Ones": positives + uncertain, "U-Ignore": positives,
                    "U-MultiClass": 2 * positives + uncertain, "U-SelfTrained": positives}[policy]
    assert labels.sum(axis=0).astype(int).tolist() == expected_sum.tolist()
    masked = uncertain if policy in ("U-Ignore", "U-SelfTrained") else np.zeros_like(uncertain)
    assert (mask == 0).sum(axis=0).tolist() == masked.tolist()
    assert (labels[mask == 0] == 0).all()


def test_mixed_policies_on_the_real_table_touch_only_their_labels(real_raw):
    policies = parse_policies("U-Zeros,Atelectasis=U-Ones,Cardiomegaly=U-MultiClass", LABEL_NAMES)
    labels, mask = apply_policy(real_raw, policies)
    column = {name: i for i, name in enumerate(LABEL_NAMES)}
    atelectasis, cardiomegaly, edema = (real_raw[:, column[n]] for n in ("Atelectasis", "Cardiomegaly", "Edema"))
    assert labels[:, column["Atelectasis"]].sum() == (atelectasis == 1).sum() + (atelectasis == -1).sum() == 67_115
    assert np.bincount(labels[:, column["Cardiomegaly"]].astype(int)).tolist() == [
        223_414 - 27_000 - 8_087, (cardiomegaly == -1).sum(), (cardiomegaly == 1).sum()]
    assert labels[:, column["Edema"]].sum() == (edema == 1).sum() == 52_246
    assert mask.min() == 1


def test_relabel_replaces_only_masked_entries_of_the_chosen_labels():
    labels = np.array([[1, 0, 0], [0, 0, 1]], dtype=np.float32)
    mask = np.array([[1, 0, 0], [0, 1, 1]], dtype=np.float32)
    probabilities = np.array([[0.9, 0.2, 0.3], [0.6, 0.7, 0.8]])
    new_labels, new_mask = relabel_uncertain(labels, mask, probabilities, [True, True, False])
    assert new_labels == pytest.approx(np.array([[1, 0.2, 0], [0.6, 0, 1]]))
    assert new_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    with pytest.raises(ValueError, match="finite and in \\[0, 1\\]"):
        relabel_uncertain(labels, mask, probabilities * 2, [True, True, False])


def test_spec_without_the_new_fields_still_parses_and_new_fields_round_trip():
    old_footer = json.dumps({"dataset": "nih", "label_names": ["A", "B"], "image_size": 64, "pixel_dtype": "uint8",
                             "mean": [0.5], "std": [0.25]})
    old = DatasetSpec.from_json(old_footer)
    assert old.label_policies == {} and not old.has_mask and old.folds == 0
    assert list(metadata_columns(old)) == ["image_id", "patient_id", "source_path", "source_row", "labels", "age",
                                           "sex", "view_position"]
    new = DatasetSpec("chexpert", ("A", "B"), 64, label_policies={"A": "U-MultiClass", "B": "U-Ignore"},
                      has_mask=True, folds=3)
    assert DatasetSpec.from_json(new.to_json()) == new
    assert new.multiclass_labels == ("A",)
    assert metadata_columns(new)["label_mask"] == "array<float>" and metadata_columns(new)["fold"] == "int"
    with pytest.raises(ValueError, match="not in label_names: \\['C'\\]"):
        DatasetSpec("chexpert", ("A",), 64, label_policies={"C": "U-Ones"})
