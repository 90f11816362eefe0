"""The index: labels, top-K, honest splits, balancing, leakage audit helpers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from cellmorph.config import DataConfig, load_config
from cellmorph.errors import CellmorphError
from cellmorph.index import (
    Index,
    build_index,
    count_val_copies_in_train,
    shared_wells,
)
from cellmorph.labels import encode_labels
from cellmorph.rundir import LabelEncoding, load_label_encoding, save_label_encoding

LABEL = "Metadata_pert_iname"


def make_metadata(
    plates: int = 6, wells: int = 48, sites: int = 3, seed: int = 0, fixed_map: bool = True
) -> pd.DataFrame:
    """Plates x wells x sites: 10 compounds in 1-3 wells each, DMSO in the rest.

    With ``fixed_map`` every plate has the same plate map (as in the JUMP pilot); otherwise
    each plate's map is shuffled.
    """
    rng = np.random.default_rng(seed)
    layout = np.array(["DMSO"] * wells, dtype=object)
    slots = rng.permutation(wells)
    pos = 0
    for i in range(10):
        n = i % 3 + 1
        layout[slots[pos : pos + n]] = f"cmpd{i}"
        pos += n
    maps = [layout if fixed_map else rng.permutation(layout) for _ in range(plates)]
    rows = [
        (f"P{p}", f"W{w:02d}", s, maps[p][w])
        for p in range(plates)
        for w in range(wells)
        for s in range(1, sites + 1)
    ]
    md = pd.DataFrame(rows, columns=["Metadata_Plate", "Metadata_Well", "Metadata_Site", LABEL])
    md["checksum"] = [f"{x:016x}" for x in rng.integers(0, 2**62, len(md))]
    return md


@pytest.fixture(scope="module")
def md() -> pd.DataFrame:
    return make_metadata()


def _keys(md: pd.DataFrame, rows: np.ndarray, by: str) -> set[str]:
    sub = md.iloc[rows]
    if by == "plate":
        return set(sub["Metadata_Plate"])
    return set(sub["Metadata_Plate"] + "/" + sub["Metadata_Well"])


def assert_honest(index: Index, md: pd.DataFrame, cfg: DataConfig) -> None:
    """What every non-leaky split must satisfy; called for every split the tests build."""
    train, val = index.train, index.val
    assert len(train) and len(val)
    np.testing.assert_array_equal(train, np.unique(train))
    np.testing.assert_array_equal(val, np.unique(val))
    assert np.intersect1d(train, val).size == 0
    # No well (plate + well) has images on both sides, checked from the metadata itself.
    assert not _keys(md, train, "well") & _keys(md, val, "well")
    if cfg.split == "plate" or cfg.group_by == "plate":
        assert not _keys(md, train, "plate") & _keys(md, val, "plate")
    # Balancing touches the training fold only; no validation row is a copy of a training row.
    assert np.isin(index.train_order, train).all()
    assert not np.isin(index.train_order, val).any()
    assert count_val_copies_in_train(index) == 0
    assert shared_wells(index) == 0
    assert (index.labels[train] >= 0).all() and (index.labels[val] >= 0).all()
    assert set(index.labels[train]) == set(range(len(index.classes)))
    assert index.summary["leaky"] is False
    # The test fold (when there is one) shares no row, well or copy with training or validation.
    test, before = index.test, np.concatenate([train, val])
    np.testing.assert_array_equal(test, np.unique(test))
    assert np.intersect1d(test, before).size == 0 and not np.isin(index.train_order, test).any()
    assert not _keys(md, test, "well") & _keys(md, before, "well")
    if cfg.split == "plate" or cfg.group_by == "plate" or cfg.test_plates:
        assert not _keys(md, test, "plate") & _keys(md, before, "plate")
    assert shared_wells(index, "test") == 0 == index.summary["test_wells_in_train_or_val"]
    json.dumps(index.summary)


HONEST = [
    dict(split="grouped", group_by="well", test_fraction=0),
    dict(split="grouped", group_by="well", test_plates=["P5"], test_fraction=0),
    dict(split="plate", test_plates=["P0"], test_fraction=0),
    dict(split="grouped", group_by="well"),
    dict(split="grouped", group_by="plate"),
    dict(split="plate"),
    dict(split="plate", val_plates=["P1", "P4"]),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("balance", ["oversample", "class_weight", "both", "none"])
@pytest.mark.parametrize("split", HONEST, ids=lambda d: "-".join(map(str, d.values())))
def test_honest_splits_never_share_a_well(md, split, balance, seed):
    cfg = DataConfig(**split, balance=balance, seed=seed)
    assert_honest(build_index(md, cfg), md, cfg)


def test_grouped_is_the_default_and_changes_with_seed(md):
    assert DataConfig().split == "grouped" and DataConfig().group_by == "well"
    a = build_index(md, DataConfig(seed=0))
    b = build_index(md, DataConfig(seed=1))
    np.testing.assert_array_equal(a.val, build_index(md, DataConfig(seed=0)).val)
    assert not np.array_equal(a.val, b.val)


def test_grouped_split_preserves_class_proportions():
    md = make_metadata(plates=16, wells=48, sites=2)
    index = build_index(md, DataConfig(val_fraction=0.25, test_fraction=0, balance="none"))
    tr, va = index.summary["train_counts"], index.summary["val_counts"]
    for c in index.classes:
        assert 0.15 <= va[c] / (tr[c] + va[c]) <= 0.35, c
    assert 0.22 <= index.summary["val_fraction_actual"] <= 0.28


def test_mixed_label_wells_still_go_to_one_side(md):
    mixed = md.copy()
    first_site = mixed["Metadata_Site"] == 1
    mixed.loc[first_site & (mixed["Metadata_Well"] == "W00"), LABEL] = "cmpd0"
    cfg = DataConfig(balance="none")
    index = build_index(mixed, cfg)
    assert index.summary["mixed_label_wells"] > 0
    assert_honest(index, mixed, cfg)


def test_plate_split_holds_out_named_plates(md):
    index = build_index(md, DataConfig(split="plate", val_plates=["P2"]))
    assert set(md.iloc[index.val]["Metadata_Plate"]) == {"P2"}
    assert "P2" not in set(md.iloc[index.train]["Metadata_Plate"])
    assert index.summary["val_plates"] == ["P2"]


def test_plate_fraction_is_deterministic_by_seed(md):
    picks = {
        s: tuple(
            build_index(
                md, DataConfig(split="plate", seed=s, val_fraction=0.25, test_fraction=0)
            ).summary["val_plates"]
        )
        for s in range(6)
    }
    assert all(len(p) == round(0.25 * 6) for p in picks.values())
    cfg = DataConfig(split="plate", seed=0, val_fraction=0.25, test_fraction=0)
    again = build_index(md, cfg).summary["val_plates"]
    assert list(picks[0]) == again
    assert len(set(picks.values())) > 1


def test_labels_classes_top_k_and_min_count(md):
    counts = md[LABEL].value_counts()
    full = build_index(md, DataConfig(balance="none"))
    assert full.classes == sorted(counts.index)
    assert full.labels.dtype == np.int8  # the narrowest type holding the class ids
    np.testing.assert_array_equal(
        np.asarray(full.classes, dtype=object)[full.labels], md[LABEL].to_numpy()
    )
    top = build_index(md, DataConfig(top_k=4, balance="none"))
    # The 4 most frequent (DMSO, then the 3-well compounds, ties broken by name), sorted by name.
    assert top.classes == ["DMSO", "cmpd2", "cmpd5", "cmpd8"]
    assert (top.labels[~md[LABEL].isin(top.classes).to_numpy()] == -1).all()
    assert top.summary["counts_before_topk"] == {k: int(v) for k, v in counts.items()}
    assert list(top.summary["counts_after_topk"]) == ["DMSO", "cmpd2", "cmpd5", "cmpd8"]
    two_wells = counts[counts >= 2 * 6 * 3].index  # at least 2 wells per plate
    mc = build_index(md, DataConfig(min_count=2 * 6 * 3, balance="none"))
    assert mc.classes == sorted(two_wells)
    both = build_index(md, DataConfig(min_count=2 * 6 * 3, top_k=2, balance="none"))
    assert both.classes == ["DMSO", "cmpd2"]


def test_missing_and_blank_labels_are_unused(md):
    m = md.copy()
    m.loc[0:5, LABEL] = None
    m.loc[6:8, LABEL] = "  "
    index = build_index(m, DataConfig(balance="none"))
    assert (index.labels[:9] == -1).all()
    assert "" not in index.classes and "  " not in index.classes
    assert index.summary["images_used"] == len(m) - 9
    assert not np.isin(np.arange(9), np.concatenate([index.train, index.val])).any()


def test_oversampling_balances_the_training_fold_only(md):
    cfg = DataConfig(balance="oversample")
    index = build_index(md, cfg)
    counts = np.bincount(index.labels[index.train_order], minlength=len(index.classes))
    assert (counts == counts.max()).all()
    assert counts.max() == np.bincount(index.labels[index.train]).max()
    assert index.class_weights is None
    assert index.summary["train_counts_balanced"]["DMSO"] == counts.max()
    none = build_index(md, DataConfig(balance="none"))
    np.testing.assert_array_equal(none.train_order, none.train)


@pytest.mark.parametrize("balance", ["class_weight", "both"])
def test_class_weights_follow_the_balanced_formula(md, balance):
    index = build_index(md, DataConfig(balance=balance))
    y = index.labels[index.train]
    k = len(index.classes)
    expected = len(y) / (k * np.bincount(y, minlength=k))
    assert index.class_weights.dtype == np.float32
    np.testing.assert_allclose(index.class_weights, expected, rtol=1e-6)
    oversampled = len(index.train_order) > len(index.train)
    assert oversampled == (balance == "both")


def test_image_split_is_flagged_and_shares_wells(md, caplog):
    index = build_index(md, DataConfig(split="image", balance="none"))
    assert index.summary["leaky"] is True
    assert any("near-duplicates" in w for w in index.summary["warnings"])
    assert "near-duplicates" in caplog.text
    assert shared_wells(index) > 0 and index.summary["val_wells_in_train"] > 0
    assert count_val_copies_in_train(index) == 0  # leaky through neighbours, not copies


def test_study_protocol_puts_copies_on_both_sides(md):
    cfg = DataConfig(split="image", oversample_before_split=True, balance="both", test_fraction=0)
    index = build_index(md, cfg)
    assert index.summary["leaky"] is True
    assert count_val_copies_in_train(index) > 0
    assert index.summary["val_copies_in_train"] == count_val_copies_in_train(index)
    assert len(np.unique(index.val)) < len(index.val)  # the oversampled copies
    assert any("oversample_before_split" in w for w in index.summary["warnings"])
    honest = build_index(md, DataConfig(split="image", balance="oversample"))
    assert count_val_copies_in_train(honest) == 0


def test_study_protocol_only_with_image_split():
    with pytest.raises(CellmorphError, match="oversample_before_split"):
        load_config(None, ["data.oversample_before_split=true"])
    with pytest.raises(CellmorphError, match="val_plates"):
        load_config(None, ["data.val_plates=[P1]"])


def test_copies_are_found_by_checksum():
    labels = np.zeros(4, dtype=np.int64)
    base = dict(classes=["a"], labels=labels, class_weights=None, summary={})
    train, val = np.array([0, 1]), np.array([2, 3])
    base["test"] = np.zeros(0, np.int64)
    plain = Index(train=train, val=val, train_repeats=None, **base)
    assert count_val_copies_in_train(plain) == 0
    dup = Index(train=train, val=val, train_repeats=None, content_ids=np.array([7, 8, 7, 9]),
                **base)  # fmt: skip
    assert count_val_copies_in_train(dup) == 1


def test_duplicate_checksums_in_metadata_are_counted(md):
    m = md.copy()
    m["checksum"] = m["Metadata_Site"].astype(str) + m[LABEL]  # same image in every well
    index = build_index(m, DataConfig(balance="none"))
    assert index.summary["val_copies_in_train"] > 0


def test_single_well_class_trains_only_with_warning(md):
    m = md.copy()
    m.loc[(m["Metadata_Plate"] == "P0") & (m["Metadata_Well"] == "W05"), LABEL] = "rare"
    cfg = DataConfig(balance="none")
    index = build_index(m, cfg)
    assert "rare" in index.summary["classes_without_val"]
    assert index.summary["train_counts"]["rare"] == 3
    assert any("rare" in w for w in index.summary["warnings"])
    assert_honest(index, m, cfg)


def test_fixed_plate_map_is_reported(md):
    index = build_index(md, DataConfig(balance="none"))
    assert index.summary["fixed_position_classes"] == 4  # the single-well compounds
    # Randomized plate maps (a different layout per plate) are not flagged.
    shuffled = make_metadata(fixed_map=False)
    index = build_index(shuffled, DataConfig(balance="none"))
    assert index.summary["fixed_position_classes"] == 0
    assert not any("confounded" in w for w in index.summary["warnings"])


def test_layout_confound_warning_when_most_classes_sit_in_one_well(md):
    m = md[md[LABEL].isin(["cmpd0", "cmpd3", "cmpd6", "DMSO"])]
    index = build_index(m.reset_index(drop=True), DataConfig(balance="none"))
    assert any("confounded" in w for w in index.summary["warnings"])


def test_label_encoding_round_trip(md, tmp_path):
    index = build_index(md, DataConfig(balance="none"))
    path = save_label_encoding(LabelEncoding(LABEL, index.classes), tmp_path / "run" / "c.json")
    enc = load_label_encoding(path)
    assert enc.label_column == LABEL and enc.classes == index.classes
    np.testing.assert_array_equal(encode_labels(md, LABEL, enc.classes), index.labels)
    other = md.head(3).assign(**{LABEL: ["cmpd1", "unknown", None]})
    got = encode_labels(other, LABEL, enc.classes)
    np.testing.assert_array_equal(got, [enc.classes.index("cmpd1"), -1, -1])
    save_label_encoding(LabelEncoding("Metadata_x", ["b", "a"]), tmp_path / "c.json")
    assert load_label_encoding(tmp_path / "c.json") == ("Metadata_x", ["b", "a"])


def test_label_encoding_errors_name_the_file_or_key(tmp_path):
    with pytest.raises(CellmorphError, match="not found"):
        load_label_encoding(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"classes": []}')
    with pytest.raises(CellmorphError, match="label_column"):
        load_label_encoding(tmp_path / "bad.json")


def test_errors_name_the_column(md):
    with pytest.raises(CellmorphError, match=r"'Metadata_moa'.*Metadata_Plate"):
        build_index(md, DataConfig(label_column="Metadata_moa"))
    with pytest.raises(CellmorphError, match="no rows have a label"):
        build_index(md.assign(**{LABEL: None}), DataConfig())
    with pytest.raises(CellmorphError, match="at least 2"):
        build_index(md, DataConfig(min_count=10**6))
    with pytest.raises(CellmorphError, match="Metadata_Well"):
        build_index(md.drop(columns="Metadata_Well"), DataConfig())


def test_errors_for_unusable_folds(md):
    with pytest.raises(CellmorphError, match="unknown plate.*P9"):
        build_index(md, DataConfig(split="plate", val_plates=["P1", "P9"]))
    every = [f"P{i}" for i in range(6)]
    with pytest.raises(CellmorphError, match="training fold is empty"):
        build_index(md, DataConfig(split="plate", val_plates=every, test_fraction=0))
    unlabelled = md.copy()
    unlabelled.loc[unlabelled["Metadata_Plate"] == "P3", LABEL] = None
    with pytest.raises(CellmorphError, match="validation fold is empty"):
        build_index(unlabelled, DataConfig(split="plate", val_plates=["P3"], test_fraction=0))
    only_p0 = md.copy()
    only_p0.loc[(only_p0["Metadata_Plate"] != "P0") & (only_p0[LABEL] == "cmpd1"), LABEL] = "DMSO"
    with pytest.raises(CellmorphError, match="no training images.*cmpd1"):
        build_index(only_p0, DataConfig(split="plate", val_plates=["P0"], test_fraction=0))
    with pytest.raises(CellmorphError, match="group_by=plate"):
        two = md[md["Metadata_Plate"].isin(["P0", "P1"])]
        build_index(two, DataConfig(group_by="plate", test_fraction=0))
    with pytest.raises(CellmorphError, match="data.test_plates: unknown plate.*P9"):
        build_index(md, DataConfig(split="plate", test_plates=["P9"], test_fraction=0))


def test_huge_oversampling_is_warned_about():
    md = make_metadata(plates=4, wells=96, sites=1)
    # 20 single-well compounds against 76 DMSO wells: oversampling multiplies the fold ~16x.
    well = md["Metadata_Well"].str[1:].astype(int)
    md[LABEL] = np.where(well < 20, "c" + well.astype(str), "DMSO")
    index = build_index(md, DataConfig(group_by="well"))
    assert len(index.train_order) > 10 * len(index.train)
    assert any("consider data.balance=class_weight" in w for w in index.summary["warnings"])
    weighted = build_index(md, DataConfig(balance="class_weight"))
    assert not any("consider data.balance" in w for w in weighted.summary["warnings"])


@pytest.mark.parametrize("k", [2, 17, 40])
def test_oversampling_counts_the_draws_of_random_over_sampler(k):
    from imblearn.over_sampling import RandomOverSampler

    from cellmorph.splits import _repeats

    rng = np.random.default_rng(k)
    labels = (rng.integers(0, k, 3000) ** 2 % k).astype(np.int8)  # uneven class sizes
    rows = np.flatnonzero(rng.random(3000) < 0.7).astype(np.int32)
    repeats = _repeats(rows, labels, seed=3)
    # RandomOverSampler itself, on the same rows and seed: the same copies of every row.
    ros = RandomOverSampler(random_state=np.random.RandomState(3))
    drawn = ros.fit_resample(rows.reshape(-1, 1), labels[rows])[0][:, 0]
    np.testing.assert_array_equal(np.repeat(rows, repeats), np.sort(drawn))
    counts = np.bincount(labels[np.repeat(rows, repeats)], minlength=k)
    present = np.bincount(labels[rows], minlength=k) > 0
    assert (counts[present] == np.bincount(labels[rows]).max()).all()
    assert repeats.min() >= 1 and repeats.dtype == np.min_scalar_type(int(repeats.max()))
    assert not np.array_equal(repeats, _repeats(rows, labels, seed=4))


def test_the_draws_are_the_same_a_block_at_a_time(monkeypatch):
    import cellmorph.splits as splits

    labels = np.r_[np.zeros(5000, np.int8), np.ones(40, np.int8), np.full(7, 2, np.int8)]
    rows = np.arange(len(labels), dtype=np.int32)
    whole = splits._repeats(rows, labels, seed=1)
    monkeypatch.setattr(splits, "_DRAW_BLOCK", 97)  # 5,000 draws in 52 blocks
    np.testing.assert_array_equal(splits._repeats(rows, labels, seed=1), whole)


def test_index_arrays_are_narrow_and_the_order_is_built_from_repeats(md):
    index = build_index(md, DataConfig())
    assert index.labels.dtype == np.int8 and index.well_ids.dtype == np.int32
    assert index.content_ids is None  # every checksum differs: a row is its own image
    assert {index.train.dtype, index.val.dtype, index.test.dtype} == {np.dtype(np.int32)}
    assert index.train_repeats is not None and len(index.train_repeats) == len(index.train)
    order = index.train_order
    assert order.dtype == np.int32 and len(order) == index.epoch_size
    np.testing.assert_array_equal(np.unique(order), index.train)
    assert index.summary["train_order_images"] == index.epoch_size


def test_too_few_wells_for_the_folds_is_a_clear_error():
    md = make_metadata(plates=1, wells=6, sites=2)
    md[LABEL] = np.where(md["Metadata_Well"] < "W03", "a", "b")  # 3 wells per class
    with pytest.raises(CellmorphError, match="data.val_fraction.*n_splits=4"):
        build_index(md, DataConfig(val_fraction=0.25, test_fraction=0))
    with pytest.raises(CellmorphError, match="data.test_fraction.*n_splits=5"):
        build_index(md, DataConfig(val_fraction=0.25, test_fraction=0.2))
    cfg = DataConfig(val_fraction=0.34, test_fraction=0)
    index = build_index(md, cfg)  # 3 folds fit
    assert_honest(index, md, cfg)


def test_test_fold_is_held_out_first_and_reported(md):
    index = build_index(md, DataConfig())  # defaults: 20% of the wells for test, 20% for val
    n = len(index.train) + len(index.val) + len(index.test)
    assert 0.12 <= len(index.test) / n <= 0.3 and 0.12 <= len(index.val) / n <= 0.35
    s = index.summary
    assert s["test_images"] == len(index.test) and sum(s["test_counts"].values()) == len(index.test)
    again = build_index(md, DataConfig())
    np.testing.assert_array_equal(index.test, again.test)  # fixed by the seed
    other = build_index(md, DataConfig(seed=1))
    assert not np.array_equal(index.test, other.test)
    plates = build_index(md, DataConfig(test_plates=["P4", "P5"], test_fraction=0))
    assert set(md.iloc[plates.test]["Metadata_Plate"]) == {"P4", "P5"}
    assert not {"P4", "P5"} & set(md.iloc[plates.val]["Metadata_Plate"])


def test_classes_that_cannot_be_validated_are_named():
    md = make_metadata(plates=2, wells=48, sites=2)
    md.loc[(md["Metadata_Plate"] == "P0") & (md["Metadata_Well"] == "W01"), LABEL] = "lonely"
    s = build_index(md, DataConfig(test_fraction=0)).summary
    assert "lonely" in s["classes_single_well"] and "lonely" in s["classes_single_plate"]
    assert "lonely" in s["classes_without_val"]
    assert any("lonely" in w for w in s["warnings"])


def test_test_fold_settings_that_contradict_are_refused():
    with pytest.raises(CellmorphError, match="test_plates and data.test_fraction"):
        load_config(None, ["data.test_plates=[P1]"])
    with pytest.raises(CellmorphError, match="under 10%"):
        load_config(None, ["data.val_fraction=0.5", "data.test_fraction=0.45"])
    with pytest.raises(CellmorphError, match="share plates"):
        load_config(None, ["data.split=plate", "data.val_plates=[P1]", "data.test_plates=[P1]",
                           "data.test_fraction=0"])  # fmt: skip


def _content_ids_by_factorize(metadata: pd.DataFrame) -> np.ndarray:
    """The ids as they were first computed: a factorize of every checksum string."""
    codes, uniques = pd.factorize(metadata["checksum"])
    codes = codes.astype(np.int64)
    blank = codes < 0
    codes[blank] = len(uniques) + np.flatnonzero(blank)
    return codes


def _checksum_columns() -> dict[str, pd.Series]:
    rng = np.random.default_rng(3)
    hexes = [f"{x:016x}" for x in rng.integers(0, 2**63, 400)]
    dups = [hexes[i] for i in rng.integers(0, 60, 400)]  # duplicate images: equal checksums
    # Strings equal in their first 16 bytes: every key collides, only exact comparison tells.
    prefix = [f"{'p' * 16}{i % 37}" for i in range(400)]
    mixed = [None if i % 13 == 0 else np.nan if i % 17 == 0 else "" if i % 19 == 0 else d
             for i, d in enumerate(dups)]  # fmt: skip
    short = [["a", "ab", "a\x00", "", "é", "ab"][i % 6] for i in range(400)]
    sliced = pa.array(mixed, pa.large_string(), from_pandas=True).slice(7, 300)  # offset chunks
    return {
        "unique_hex": pd.Series(hexes),
        "duplicates": pd.Series(dups),
        "same_prefix": pd.Series(prefix),
        "missing_and_blank": pd.Series(mixed, dtype=object),
        "missing_str": pd.Series(mixed, dtype="str"),
        "short_and_zero_bytes": pd.Series(short),
        "categorical": pd.Series(mixed, dtype="category"),
        "object": pd.Series(dups, dtype=object),
        "numbers": pd.Series(rng.integers(0, 50, 400)),  # not text: factorized as values
        "all_missing": pd.Series([None] * 5, dtype=object),
        "empty": pd.Series([], dtype="str"),
        "sliced_chunks": pa.chunked_array([sliced, pa.array(short, pa.large_string())]).to_pandas(),
        "chunked": pd.concat([pd.Series(dups[:150]), pd.Series(mixed[150:], dtype="str")]),
    }


@pytest.mark.parametrize("name", list(_checksum_columns()))
def test_content_ids_are_those_of_a_factorize_of_the_checksums(name):
    from cellmorph.content_ids import content_ids as _content_ids

    md = pd.DataFrame({"checksum": _checksum_columns()[name]})
    ids = _content_ids(md)
    expected = _content_ids_by_factorize(md)
    if ids is None:  # only when every image is its own: the row is the id
        assert len(np.unique(expected)) == len(expected) and name != "numbers"
        return
    assert ids.dtype == np.int32  # row ids: 4 bytes a row below 2**31 rows
    np.testing.assert_array_equal(ids, expected)


def test_well_ids_are_those_of_the_store_layout(md):
    from cellmorph.store.layout import well_codes, well_codes_from

    m = md.sample(frac=1.0, random_state=1).reset_index(drop=True)  # row order is not id order
    codes, names = well_codes(m)
    assert codes.dtype == np.int32
    expected = pd.factorize(m["Metadata_Plate"] + "/" + m["Metadata_Well"], sort=True)
    np.testing.assert_array_equal(codes, expected[0])
    assert list(names) == list(expected[1])
    # A well name per row: more (plate, well) pairs than the 2**20 counted; sorted instead.
    plates = np.array([f"P{i:04d}" for i in range(1100)], object)
    wells = np.array([f"W{i:03d}" for i in range(1000)], object)
    sparse = well_codes_from(np.array([1099, 0, 5, 0]), plates, np.array([0, 999, 3, 999]), wells)
    np.testing.assert_array_equal(sparse[0], [2, 0, 1, 0])
    assert list(sparse[1]) == ["P0000/W999", "P0005/W003", "P1099/W000"]
