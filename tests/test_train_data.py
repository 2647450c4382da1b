"""Trainer pieces without training: data readers and download, augmentation, config/CLI, optimizer."""

from __future__ import annotations

import hashlib
import json
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import augment, cli, data, faults, optim
from train.config import PRESETS, Config, ConfigError, OptimConfig, flat_fields, with_overrides
from train.testing import synthetic, write_archive, write_cifar10

N_TRAIN, N_TEST = 50, 10


@pytest.fixture(scope="module")
def expected() -> tuple[np.ndarray, np.ndarray]:
    return synthetic(N_TRAIN + N_TEST, 0)


def _check(ds: data.Cifar10, expected: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = expected
    assert ds.train_images.shape == (N_TRAIN, 32, 32, 3) and ds.train_images.dtype == np.uint8
    np.testing.assert_array_equal(ds.train_images, x[:N_TRAIN])
    np.testing.assert_array_equal(ds.train_labels, y[:N_TRAIN])
    np.testing.assert_array_equal(ds.test_images, x[N_TRAIN:])
    np.testing.assert_array_equal(ds.test_labels, y[N_TRAIN:])
    assert ds.train_labels.dtype == np.int32


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_readers_both_layouts_and_archive(tmp_path, expected, layout):
    root = write_cifar10(tmp_path / "d", N_TRAIN, N_TEST, layout=layout)
    sub = root / (data.BIN_DIR if layout == "bin" else data.PY_DIR)
    _check(data.load(root), expected)  # the parent dir
    _check(data.load(sub), expected)  # the batch dir itself
    archive = write_archive(tmp_path / "a", N_TRAIN, N_TEST, layout=layout)
    _check(data.load(archive), expected)  # the .tar.gz file
    _check(data.load(archive.parent), expected)  # a dir holding the .tar.gz


def test_binary_record_layout_is_the_official_one(tmp_path):
    # label byte, then the 1024 red, 1024 green, 1024 blue values in row-major order
    img = np.zeros((32, 32, 3), np.uint8)
    img[0, 1] = (10, 20, 30)
    rec = np.concatenate([[7], img.transpose(2, 0, 1).ravel()]).astype(np.uint8)
    x, y = data.parse_binary("mem", rec.tobytes())
    assert y.tolist() == [7] and x.shape == (1, 32, 32, 3) and x[0, 0, 1].tolist() == [10, 20, 30]


def test_pickle_reader_refuses_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    blob = pickle.dumps({b"data": Evil(), b"labels": [0]})
    with pytest.raises(data.DataError, match=r"refusing to load builtins\.print"):
        data.parse_pickle("evil", blob)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "not a whole number of 3073-byte records"),
    ("label", "label 12 outside 0..9"),
    ("missing", "incomplete CIFAR-10, missing data_batch_3.bin"),
    ("empty_dir", "no CIFAR-10 here"),
    ("no_path", "no such file or directory"),
    ("bad_tar", "not a readable CIFAR-10 .tar.gz"),
])
def test_bad_data_gives_one_clear_error(tmp_path, damage, message):
    root = write_cifar10(tmp_path / "d", N_TRAIN, N_TEST)
    b = root / data.BIN_DIR
    target = root
    if damage == "truncate":
        blob = (b / "data_batch_2.bin").read_bytes()
        (b / "data_batch_2.bin").write_bytes(blob[:-5])
    elif damage == "label":
        blob = bytearray((b / "test_batch.bin").read_bytes())
        blob[data.RECORD] = 12
        (b / "test_batch.bin").write_bytes(bytes(blob))
    elif damage == "missing":
        (b / "data_batch_3.bin").unlink()
    elif damage == "empty_dir":
        target = tmp_path / "empty"
        target.mkdir()
    elif damage == "no_path":
        target = tmp_path / "nope"
    elif damage == "bad_tar":
        target = tmp_path / "cifar-10-binary.tar.gz"
        target.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(data.DataError, match=message) as info:
        data.load(target)
    assert "\n" not in str(info.value)


def test_pickle_with_wrong_shape_is_refused(tmp_path):
    import pickle

    root = write_cifar10(tmp_path / "d", N_TRAIN, N_TEST, layout="py")
    with open(root / data.PY_DIR / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}, f)
    with pytest.raises(data.DataError, match=r"expected uint8\[n, 3072\]"):
        data.load(root)


def test_download_with_md5_then_cached(tmp_path, expected):
    archive = write_archive(tmp_path / "src", N_TRAIN, N_TEST)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    ds = data.load_or_download("", cache, archive.as_uri(), md5, progress=False)
    _check(ds, expected)
    assert (cache / data.BIN_DIR / "data_batch_5.bin").is_file()
    assert not list(cache.glob(".*"))  # no partial download or temp dir left
    archive.unlink()  # the second call reads the cache and never downloads
    _check(data.load_or_download("", cache, archive.as_uri(), md5, progress=False), expected)


def test_download_md5_mismatch_and_offline(tmp_path):
    archive = write_archive(tmp_path / "src", N_TRAIN, N_TEST)
    cache = tmp_path / "cache"
    with pytest.raises(data.DataError, match=r"has md5 \w+, expected 0123") as info:
        data.load_or_download("", cache, archive.as_uri(), "0123" + "0" * 28, progress=False)
    assert not any(cache.iterdir())  # nothing partial kept
    with pytest.raises(data.DataError, match="offline\\? pass --data-dir") as info:
        data.load_or_download("", cache, "http://127.0.0.1:9/cifar-10-binary.tar.gz", "", progress=False)
    assert "\n" not in str(info.value)


def test_unpack_extracts_only_batch_files(tmp_path):
    archive = write_archive(tmp_path / "src", N_TRAIN, N_TEST)
    with tarfile.open(archive, "r:gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("data_batch_1.bin") for n in names)
    out = data.unpack(archive, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.bin" for n in (*data.TRAIN_FILES, data.TEST_FILE))


# ---------------------------------------------------------------- augmentation
def test_augment_is_keyed_and_preserves_content():
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    key = jax.random.key(0)
    a = augment.augment(x, jax.random.fold_in(key, 3))
    b = augment.augment(x, jax.random.fold_in(key, 3))
    c = augment.augment(x, jax.random.fold_in(key, 4))
    assert a.shape == (16, 32, 32, 3) and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    # no padding, no flip: exactly ToTensor()
    np.testing.assert_array_equal(augment.augment(x, key, padding=0, flip=False), np.asarray(x) / np.float32(255))
    # each crop is a window of the zero-padded image: the centre crop exists among 25 offsets
    crops = augment.random_crop(x, jax.random.key(1), 2)
    padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
    for i in range(4):
        assert any(np.array_equal(crops[i], padded[i, dy:dy + 32, dx:dx + 32]) for dy in range(5) for dx in range(5))
    flipped = augment.random_flip(x, jax.random.key(2))
    for i in range(16):
        assert np.array_equal(flipped[i], x[i]) or np.array_equal(flipped[i], x[i, :, ::-1])


# ---------------------------------------------------------------- config and CLI
def test_every_field_is_a_documented_flag(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for name, (_, f) in flat_fields().items():
        flag = "--" + name.replace("_", "-")
        assert flag in out, flag
        assert " ".join(f.metadata["help"].split())[:40] in out, name
    for required in ("--data-dir", "--workdir", "--epochs", "--batch-size", "--model", "--optimizer", "--lr",
                     "--weight-decay", "--label-smoothing", "--seed", "--init-from", "--num-classes", "--freeze",
                     "--export-torch", "--checkpoint-every", "--precision", "--eval-only"):
        assert required in out


def test_presets_and_overrides(capsys):
    cfg, _ = cli.parse(["--preset", "tiny", "--lr", "0.3", "--freeze", "stem.*", "head.bias", "--no-flip"])
    assert cfg.optim.lr == 0.3 and cfg.optim.freeze == ["stem.*", "head.bias"] and cfg.data.flip is False
    assert cfg.model.width == PRESETS["tiny"].model.width  # untouched preset value
    assert cli.main(["--preset", "cifar10", "--show-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model"]["precision"] == "bfloat16"
    assert with_overrides(Config(), {"epochs": 3}).optim.epochs == 3
    with pytest.raises(ConfigError):
        with_overrides(Config(), {"nope": 1})


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--optimizer", "lion"], "invalid choice: 'lion'"),
    (["--lr", "abc"], "invalid float value: 'abc'"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1)"),
    (["--export-torch", "model.pt"], "must name a .safetensors file"),
    (["--init-config", "{}"], "--init-config needs --init-from"),
])
def test_bad_flags_give_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxdsc-train: error: ") and message in err


def test_fault_spec_parsing():
    got = faults.parse("kill@7, nan@3-5,crash-rename")
    assert [(f.action, f.first, f.last) for f in got] == [("kill", 7, 7), ("nan", 3, 5), ("crash-rename", 0, 2**62)]
    assert got[1].covers(4) and not got[1].covers(6)
    for bad in ("explode@3", "kill@x"):
        with pytest.raises(ValueError, match=faults.ENV_VAR):
            faults.parse(bad)


# ---------------------------------------------------------------- optimizer
def _params():
    return {"stem": {"conv": {"kernel": jnp.ones((3, 3, 3, 4))}, "bn": {"scale": jnp.ones(4), "bias": jnp.ones(4)}},
            "head": {"kernel": jnp.ones((4, 10)), "bias": jnp.ones(10)}}


def test_optimizer_masks_decay_freezes_and_head_lr():
    params = _params()
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    cfg = OptimConfig(optimizer="sgd", lr=0.5, weight_decay=0.1, schedule="constant", head_lr=0.05,
                      freeze=["stem.bn.*"], epochs=1)
    tx, _ = optim.make_optimizer(cfg, params, steps_per_epoch=10)
    updates, _ = tx.update(zeros, tx.init(params), params)
    # zero gradient: only decoupled decay moves kernels (-lr * wd * p), never norms/biases
    np.testing.assert_allclose(updates["stem"]["conv"]["kernel"], -0.5 * 0.1, rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.05 * 0.1, rtol=1e-6)  # head LR
    np.testing.assert_array_equal(updates["head"]["bias"], 0.0)
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(ones, tx.init(params), params)
    np.testing.assert_array_equal(updates["stem"]["bn"]["scale"], 0.0)  # frozen
    assert float(jnp.abs(updates["head"]["bias"]).max()) > 0
    with pytest.raises(ConfigError, match="matches no parameter"):
        optim.make_optimizer(OptimConfig(freeze=["nothing"]), params, 10)


def test_schedules_and_clipping():
    for kind in ("cosine", "onecycle"):
        lr = optim.schedule(OptimConfig(schedule=kind, lr=1.0, epochs=10, warmup_epochs=2), 1.0, 10)
        values = np.asarray(lr(jnp.arange(101)))
        assert values.max() == pytest.approx(1.0, abs=1e-6) and int(values.argmax()) == 20
        assert values[-1] == pytest.approx(0.0, abs=1e-6)
    params = _params()
    tx, _ = optim.make_optimizer(OptimConfig(grad_clip=1.0, schedule="constant", lr=1.0, momentum=0.0,
                                             weight_decay=0.0), params, 10)
    big = jax.tree_util.tree_map(lambda p: 100 * jnp.ones_like(p), params)
    updates, _ = tx.update(big, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)


# ---------------------------------------------------------------- the jitted step
def test_train_step_skips_nonfinite_batches_and_traces_once(monkeypatch):
    from jax.sharding import Mesh

    from train import faults, steps
    from train.config import ModelConfig
    from train.model import build

    graph_train, graph_eval, params, stats, consts = steps.split_model(build(ModelConfig(width=4, depth=1), 0))
    cfg = OptimConfig(lr=0.1, ema_decay=0.9, epochs=1)
    tx, lr = optim.make_optimizer(cfg, params, 10)
    fn = steps.make_train_step(graph_train, tx, lr, num_classes=10, label_smoothing=0.1, crop_padding=4,
                               flip=True, ema_decay=0.9)
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    monkeypatch.setattr(faults, "_FAULTS", ())
    assert faults.wrap_train_step(fn) is fn  # no fault requested: the production step, untouched
    monkeypatch.setattr(faults, "_FAULTS", faults.parse("nan@2"))
    train_step, _ = steps.jit_steps(faults.wrap_train_step(fn), steps.make_eval_step(graph_eval), mesh)
    before = steps.TRACES["train_step"]
    state = steps.create_state(params, stats, consts, tx, mesh, seed=0, ema=True)
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    batch = lambda poison: {"image": images, "label": np.arange(8, dtype=np.int32),  # noqa: E731
                            "poison": np.full(8, poison, np.float32)}
    state, m = train_step(state, batch(0.0))
    assert int(m["finite"]) == 1 and int(state.step) == 1
    snapshot = jax.device_get(state)
    state, m = train_step(state, batch(np.nan))
    assert int(m["finite"]) == 0 and int(state.step) == 2 and int(state.skipped) == 1
    for name in ("params", "batch_stats", "opt_state", "ema"):
        for a, b in zip(jax.tree_util.tree_leaves(getattr(snapshot, name)),
                        jax.tree_util.tree_leaves(getattr(state, name)), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)
    state, m = train_step(state, batch(0.0))
    assert int(m["finite"]) == 1
    assert not np.array_equal(snapshot.params["head"]["kernel"], state.params["head"]["kernel"])
    assert steps.TRACES["train_step"] - before == 1


# ---------------------------------------------------------------- data order
def _reference_order(seed: int, epoch: int, n: int) -> list[int]:
    """epoch_order's definition in plain Python integers (no NumPy): the order must not depend on NumPy."""
    mask = (1 << 64) - 1

    def mix(x: int) -> int:
        z = (x + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    key = mix(mix(seed & mask) ^ (epoch & mask))
    return sorted(range(n), key=lambda i: (mix(key ^ i), i))


@pytest.mark.parametrize(("seed", "epoch", "n"), [(0, 0, 1), (0, 0, 50), (7, 3, 257), (-1, 12, 100), (2**40, 0, 64)])
def test_epoch_order_is_its_integer_definition(seed, epoch, n):
    from train.feed import epoch_order

    order = epoch_order(seed, epoch, n)
    assert order.dtype == np.int32 and sorted(order.tolist()) == list(range(n))
    assert order.tolist() == _reference_order(seed, epoch, n)


def test_epoch_orders_differ_and_look_uniform():
    from train.feed import epoch_order

    orders = np.stack([epoch_order(0, e, 10) for e in range(3000)])
    assert len({o.tobytes() for o in orders[:50]}) == 50  # every epoch shuffles anew
    assert not np.array_equal(epoch_order(1, 0, 100), epoch_order(0, 0, 100))
    # Where index 0 lands over 3000 epochs: 300 expected per position; a 5-sigma band (~±82)
    # catches a biased shuffle, a fixed point or a rotation.
    counts = np.bincount(np.argmax(orders == 0, axis=1), minlength=10)
    assert np.all(np.abs(counts - 300) < 82), counts


def test_resume_refuses_checkpoints_from_another_data_order(tmp_path, monkeypatch, capsys):
    from train import cli, feed
    from train.testing import write_cifar10

    data = write_cifar10(tmp_path / "d", 64, 32)
    args = ["--preset", "tiny", "--data-dir", str(data), "--workdir", str(tmp_path / "w"), "--no-progress",
            "--no-plot", "--train-limit", "0", "--test-limit", "0", "--batch-size", "32", "--epochs", "1"]
    assert cli.main(args) == 0
    meta_path = next((tmp_path / "w" / "checkpoints").glob("step_*")) / "meta.json"
    assert json.loads(meta_path.read_text())["data_order"] == feed.ORDER
    monkeypatch.setattr(feed, "ORDER", "some-future-order")
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "trained with data order 'splitmix64-argsort-v1'; this trainer uses 'some-future-order'" in err
