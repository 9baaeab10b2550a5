"""Patient-level splits: deterministic, disjoint, close to the fractions, official lists honoured."""
import pandas as pd
import pytest

from conftest import NIH, require
from cxr_pipeline.etl.splits import SplitLeakError, assign_splits, check_patient_disjoint, parse_fractions


@pytest.fixture(scope="module")
def nih_table():
    return pd.read_csv(require(NIH / "Data_Entry_2017_v2020.csv.gz"), dtype=str)


def test_full_nih_table_split_is_patient_disjoint_deterministic_and_near_fractions(nih_table):
    patients = nih_table["Patient ID"]
    split = assign_splits(patients, seed=0)
    check_patient_disjoint(patients, split)
    assert split.equals(assign_splits(patients, seed=0))
    assert not split.equals(assign_splits(patients, seed=1))
    per_patient = pd.DataFrame({"p": patients, "s": split}).drop_duplicates("p")["s"].value_counts(normalize=True)
    assert len(patients.unique()) == 30805
    for name, fraction in zip(("train", "val", "test"), (0.7, 0.1, 0.2)):
        assert abs(per_patient[name] - fraction) < 0.01


def test_patient_keeps_its_split_when_other_patients_are_added(nih_table):
    few = nih_table["Patient ID"].iloc[:5000]
    assert assign_splits(few, 3).equals(assign_splits(nih_table["Patient ID"], 3).iloc[:5000])


def test_official_lists_keep_test_and_divide_train_val_by_patient():
    patients = pd.Series([f"p{i // 3}" for i in range(3000)])
    official = pd.Series(["test" if int(p[1:]) % 5 == 0 else "train_val" for p in patients])
    split = assign_splits(patients, 0, (0.8, 0.2, 0.0), official)
    assert (split[official == "test"] == "test").all()
    assert set(split[official == "train_val"]) == {"train", "val"}
    check_patient_disjoint(patients, split)
    val_share = (split[official == "train_val"] == "val").mean()
    assert 0.14 < val_share < 0.26


def test_leak_is_reported_with_patient_ids():
    with pytest.raises(SplitLeakError, match="p1"):
        check_patient_disjoint(pd.Series(["p1", "p1", "p2"]), pd.Series(["train", "test", "val"]))


@pytest.mark.parametrize("text", ["0.7,0.2", "0.5,0.5,0.5", "-0.1,0.6,0.5"])
def test_bad_fractions_are_refused(text):
    with pytest.raises(ValueError):
        parse_fractions(text)
