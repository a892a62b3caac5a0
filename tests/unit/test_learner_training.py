"""Real tiny training runs on LC25000 lung patches (split by group_id), save/load, Grad-CAM."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from learner.core.backbone import Backbone, create_backbone
from learner.core.classifier import Classifier, load_model, save_model
from learner.core.config import AugmentConfig, BackboneSpec, TrainConfig
from learner.core.data import Reader, image_files
from learner.core.embeddings import embed
from learner.core.errors import Cancelled, LearnerError
from learner.core.evaluation import evaluate
from learner.core.gradcam import grad_cam
from learner.core.training import (
    EarlyStopping,
    class_sample,
    class_weights,
    finetune,
    lr_factor,
    self_train_head,
    train_head,
)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "lc25000_lung"
needs_data = pytest.mark.skipif(not (DATA / "manifest.csv").is_file(), reason="shared LC25000 data not present")
HEAD_SIZE = 112  # embeddings at half resolution: 4x cheaper, still far above chance


def grouped_split(per_class_train: int, per_class_test: int, seed: int = 0) -> tuple[list, list, list[str]]:
    """One image from each of distinct groups; train and test groups never overlap."""
    with open(DATA / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    classes = sorted({r["label"] for r in rows})
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in classes:
        by_group: dict[str, list[str]] = {}
        for r in rows:
            if r["label"] == label:
                by_group.setdefault(r["group_id"], []).append(r["path"])
        groups = sorted(by_group)
        rng.shuffle(groups)
        pick = [(str(DATA / by_group[g][0]), classes.index(label)) for g in groups]
        train += pick[:per_class_train]
        test += pick[per_class_train : per_class_train + per_class_test]
    return train, test, classes


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return create_backbone()


@pytest.fixture(scope="module")
def head_run(backbone: Backbone, tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not (DATA / "manifest.csv").is_file():
        pytest.skip("shared LC25000 data not present")
    train, test, classes = grouped_split(20, 20)
    cache = tmp_path_factory.mktemp("emb")

    def embed_all(items: list) -> np.ndarray:
        paths = [p for p, _ in items]
        return embed(backbone, image_files(paths), keys=paths, cache_dir=cache, image_size=HEAD_SIZE, batch_size=30)

    x_train, x_test = embed_all(train), embed_all(test)
    y_train, y_test = np.array([y for _, y in train]), np.array([y for _, y in test])
    clf = train_head(x_train, y_train, classes, backbone, TrainConfig(), image_size=HEAD_SIZE)
    return {"clf": clf, "x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "test": test,
            "classes": classes}  # fmt: skip


@needs_data
def test_head_on_60_labels_beats_chance_on_held_out_groups(head_run: dict) -> None:
    proba = head_run["clf"].predict_proba(head_run["x_test"])
    assert proba.shape == (60, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    metrics = evaluate(head_run["y_test"], proba, head_run["classes"])
    assert metrics["accuracy"] > 0.6  # chance is 1/3; typically ~0.85 here
    assert metrics["roc_auc_ovr"] > 0.8


@needs_data
def test_head_probabilities_equal_sklearn_logistic_regression(head_run: dict) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = head_run["x_train"], head_run["y_train"]
    scaler = StandardScaler().fit(x)
    ref = LogisticRegression(C=TrainConfig().head_c, max_iter=1000, class_weight="balanced").fit(scaler.transform(x), y)
    ours = head_run["clf"].predict_proba(head_run["x_test"])
    np.testing.assert_allclose(ours, ref.predict_proba(scaler.transform(head_run["x_test"])), atol=1e-4)


@needs_data
def test_head_model_saves_loads_and_predicts_from_images(head_run: dict, tmp_path: Path) -> None:
    clf: Classifier = head_run["clf"]
    path = tmp_path / "models" / "v1.pt"
    meta = save_model(path, clf, extra={"round": 3})
    assert json.loads(json.dumps(meta)) == meta
    assert meta["mode"] == "head" and meta["class_names"] == head_run["classes"]
    assert meta["backbone"] == {"name": "tf_efficientnet_lite0", "weights": "package", "multiscale": False}
    assert meta["normalisation"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert load_model(path).extra == {"n_train": 60, "labels": "hard", "round": 3}
    assert [p.name for p in path.parent.iterdir()] == ["v1.pt"]  # no temp file left behind

    loaded = load_model(path)
    np.testing.assert_allclose(
        loaded.predict_proba(head_run["x_test"]), clf.predict_proba(head_run["x_test"]), atol=1e-6
    )
    few = image_files([p for p, _ in head_run["test"][:3]])
    np.testing.assert_allclose(loaded.predict_proba(few), clf.predict_proba(head_run["x_test"][:3]), atol=1e-4)


@needs_data
def test_grad_cam_gives_a_heatmap_for_one_patch(head_run: dict) -> None:
    img = image_files([head_run["test"][0][0]])[0]
    heat, cls = grad_cam(head_run["clf"], img)
    assert heat.shape == (HEAD_SIZE, HEAD_SIZE) and heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() <= 1.0 and heat.std() > 0.01
    assert cls == int(head_run["clf"].predict_proba(head_run["x_test"][:1]).argmax())
    with pytest.raises(LearnerError, match="target_class"):
        grad_cam(head_run["clf"], img, target_class=7)


@needs_data
def test_a_multiscale_head_predicts_the_same_from_images_after_loading_and_gives_a_grad_cam(
    head_run: dict, tmp_path: Path
) -> None:
    ms = create_backbone(BackboneSpec(multiscale=True))
    assert ms.num_features > head_run["x_train"].shape[1]
    rows = [0, 1, 20, 21, 40, 41]  # two images of each class
    paths = [head_run["test"][i][0] for i in rows]
    x = embed(ms, image_files(paths), image_size=HEAD_SIZE, batch_size=6)
    # The multiscale embedding starts with the plain one: the final features, then the stages' means.
    np.testing.assert_allclose(x[:, : head_run["x_train"].shape[1]], head_run["x_test"][rows], atol=1e-4)
    y = np.array([head_run["test"][i][1] for i in rows])
    clf = train_head(x, y, head_run["classes"], ms, TrainConfig(), image_size=HEAD_SIZE)
    save_model(tmp_path / "ms.pt", clf)
    loaded = load_model(tmp_path / "ms.pt")
    assert loaded.spec.multiscale and loaded.backbone().pooled_stages == (4, 5, 6)
    np.testing.assert_allclose(loaded.predict_proba(image_files(paths[:2])), clf.predict_proba(x[:2]), atol=1e-4)
    heat, _ = grad_cam(loaded, image_files(paths[:1])[0])
    assert heat.shape == (HEAD_SIZE, HEAD_SIZE) and heat.std() > 0.01


def test_head_needs_two_classes(backbone: Backbone) -> None:
    with pytest.raises(LearnerError, match="at least two classes"):
        train_head(np.zeros((4, 1280)), [1, 1, 1, 1], ["a", "b", "c"], backbone)


def test_head_gives_unlabelled_classes_no_probability(backbone: Backbone) -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (10, 8)), rng.normal(3, 1, (10, 8))]).astype(np.float32)
    y = np.repeat([0, 2], 10)  # class 1 has no labels yet
    clf = train_head(x, y, ["a", "b", "c"], backbone)
    proba = clf.predict_proba(x)
    assert proba[:, 1].max() < 1e-6
    assert (proba.argmax(1) == y).mean() > 0.9


def test_the_head_fits_the_model_scikit_learn_fits_on_standardised_rows(backbone: Backbone) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    x = (rng.normal(0, 1, (300, 16)) + y[:, None] * 0.4).astype(np.float32)
    x[:, 3] = 2.0  # a constant feature: left unscaled, as StandardScaler leaves it
    config = TrainConfig()
    scaler = StandardScaler().fit(x)
    reference = LogisticRegression(C=config.head_c, max_iter=config.head_max_iter, class_weight="balanced")
    reference.fit(scaler.transform(x), y)
    head = train_head(x, y, ["a", "b", "c"], backbone, config)
    np.testing.assert_allclose(head.predict_proba(x), reference.predict_proba(scaler.transform(x)), atol=1e-5)
    assert head.network.scale[3].item() == 1.0  # type: ignore[index, union-attr]


def test_a_class_sample_keeps_rare_classes_whole_when_classes_weigh_the_same() -> None:
    y = np.repeat([0, 1, 2], [7, 400, 2000])
    picks = class_sample(y, 300, balanced=True, seed=4)
    assert len(picks) == 300 and len(np.unique(picks)) == 300 and np.all(np.diff(picks) > 0)
    counts = np.bincount(y[picks])
    assert counts[0] == 7 and abs(int(counts[1]) - int(counts[2])) <= 1  # the rest split evenly
    np.testing.assert_array_equal(class_sample(y, 300, balanced=True, seed=4), picks)  # seeded
    assert not np.array_equal(class_sample(y, 300, balanced=True, seed=5), picks)
    np.testing.assert_array_equal(class_sample(y, 5000, balanced=True, seed=4), np.arange(len(y)))  # under the cap


def test_an_unweighted_class_sample_keeps_the_class_mix_and_every_class() -> None:
    y = np.repeat([0, 1, 2], [3, 3000, 6997])
    counts = np.bincount(y[class_sample(y, 1000, balanced=False, seed=0)])
    assert counts.sum() == 1000 and counts[0] >= 1  # 0.3 by share: one, so the class stays in the fit
    assert abs(int(counts[1]) - 300) <= 1 and abs(int(counts[2]) - 700) <= 1


@needs_data
def test_tiny_finetune_runs_end_to_end_and_round_trips_a_checkpoint(tmp_path: Path) -> None:
    train, test, classes = grouped_split(8, 10, seed=1)
    config = TrainConfig(
        mode="finetune", image_size=64, batch_size=8, epochs=2, frozen_epochs=1, lr=3e-3, patience=2, seed=0
    )
    stages: set[str] = set()
    result = finetune(
        BackboneSpec(),
        image_files([p for p, _ in train]),
        [y for _, y in train],
        classes,
        config,
        val_images=image_files([p for p, _ in test]),
        val_labels=[y for _, y in test],
        progress=lambda stage, f: stages.add(stage),
    )
    assert stages == {"train", "validate"}
    assert [h["frozen"] for h in result.history] == [True, False]
    assert 0 <= result.best_epoch < 2 and result.val_metrics is not None
    clf = result.classifier
    val = image_files([p for p, _ in test])
    proba = clf.predict_proba(val)
    assert proba.shape == (30, 3)
    best = result.history[result.best_epoch]["val_accuracy"]
    accuracy = evaluate([y for _, y in test], proba, classes)["accuracy"]
    assert accuracy == pytest.approx(best)  # the best epoch's weights were kept
    assert accuracy >= 0.5  # 24 labels, 64 px, 2 epochs; chance is 1/3 on these 30 held-out groups

    path = tmp_path / "ft.pt"
    save_model(path, clf)
    loaded = load_model(path)
    assert loaded.mode == "finetune" and loaded.image_size == 64
    np.testing.assert_allclose(loaded.predict_proba(val), proba, atol=1e-5)
    assert loaded.embed(val).shape == (30, 1280)
    heat, _ = grad_cam(loaded, val[0])
    assert heat.shape == (64, 64)


@needs_data
@pytest.mark.parametrize("reader", [None, Reader(kind="threads", workers=2)], ids=["serial", "threads"])
def test_finetune_is_cancelled_between_batches(reader: Reader | None) -> None:
    train, _, classes = grouped_split(4, 0)
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    with pytest.raises(Cancelled):
        finetune(
            BackboneSpec(weights="none"),
            image_files([p for p, _ in train]),
            [y for _, y in train],
            classes,
            TrainConfig(mode="finetune", image_size=32, batch_size=4, epochs=3, augment=AugmentConfig()),
            should_stop=should_stop,
            reader=reader,
        )
    assert calls["n"] == 2  # stopped at the second batch, not at the end of training


@needs_data
def test_a_finetune_read_by_threads_trains_the_same_model_as_one_read_serially() -> None:
    """The reader only decides who decodes: batches, their order and every weight come out the same."""
    train, test, classes = grouped_split(4, 2, seed=2)
    config = TrainConfig(mode="finetune", image_size=32, batch_size=4, epochs=2, frozen_epochs=1, seed=0)

    def run(reader: Reader) -> np.ndarray:
        result = finetune(
            BackboneSpec(weights="none"),
            image_files([p for p, _ in train]),
            [y for _, y in train],
            classes,
            config,
            val_images=image_files([p for p, _ in test]),
            val_labels=[y for _, y in test],
            reader=reader,
        )
        return result.classifier.predict_proba(image_files([p for p, _ in test]))

    serial = run(Reader())
    threads = run(Reader(kind="threads", workers=2, prefetch=1))
    np.testing.assert_array_equal(threads, serial)


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    f = [lr_factor(s, 100, 10, 0.01) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[100] == pytest.approx(0.01)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))


def test_early_stopping_keeps_the_best_state_and_respects_patience() -> None:
    model = nn.Linear(1, 1)
    stopper = EarlyStopping(patience=1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    assert not stopper.step(0, (0.5,), model)
    with torch.no_grad():
        model.weight.fill_(2.0)
    assert not stopper.step(1, (0.7,), model)
    with torch.no_grad():
        model.weight.fill_(3.0)
    assert not stopper.step(2, (0.6,), model)
    assert stopper.step(3, (0.7,), model)  # not better than 0.7: second bad epoch in a row
    assert stopper.best_epoch == 1
    assert stopper.best_state is not None and float(stopper.best_state["weight"]) == 2.0


def test_class_weights_balance_the_counts() -> None:
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    np.testing.assert_allclose(w, [4 / 6, 4 / 2, 0.0])


def test_self_training_adds_the_pool_items_the_head_is_sure_of(backbone: Backbone) -> None:
    rng = np.random.default_rng(3)
    centres = np.array([[0.0] * 6, [3.0] * 6])
    x = np.concatenate([rng.normal(c, 1.0, (4, 6)) for c in centres]).astype(np.float32)
    y = np.repeat([0, 1], 4)
    pool = np.concatenate([rng.normal(c, 1.0, (200, 6)) for c in centres]).astype(np.float32)
    config = TrainConfig(head_c=1.0)
    plain = train_head(x, y, ["a", "b"], backbone, config)
    sure = int((plain.predict_proba(pool).max(1) > 0.9).sum())
    assert 0 < sure < len(pool)
    st = self_train_head(x, y, pool, ["a", "b"], backbone, config, threshold=0.9)
    assert st.extra["pseudo_labels"] == sure and st.extra["n_train"] == len(x)
    # The pseudo-labelled pool moves the head: it is surer of the pool than the plain head was.
    assert (st.predict_proba(pool).max(1) > 0.9).sum() > sure
    # Nothing is sure enough: the plain head, unchanged.
    none = self_train_head(x, y, pool, ["a", "b"], backbone, config, threshold=1.0)
    assert none.extra["pseudo_labels"] == 0
    np.testing.assert_allclose(none.predict_proba(pool), plain.predict_proba(pool), atol=1e-6)
