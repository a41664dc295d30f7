import dask.array as da
import numpy as np
import pytest
import xarray as xr
from scipy.linalg import subspace_angles

from emscale.errors import ConfigError, StoreError
from emscale.model_spec import load_model
from emscale.results import ResultsStore
from emscale.stages.preprocess import Preprocessor, write_preprocess_stage
from emscale.stages.train import TrainConfig, write_train_stage
from emscale.store import ChunkPolicy
from emscale.synth.eels import synth_eels
from emscale.train_stream import ChunkStream
from emscale.trainer import train_autoencoder

SMALL = dict(latent_dim=4, widths=(64, 32), threads=2)


@pytest.fixture(scope="module")
def eels_stage(tmp_path_factory):
    import dask

    path = tmp_path_factory.mktemp("train") / "results.zarr"
    scan = synth_eels((48, 40), channels=128, seed=3, policy=ChunkPolicy(target_mib=0.1))
    with dask.config.set(scheduler="synchronous"):
        write_preprocess_stage(ResultsStore(path), scan,
                               Preprocessor([{"step": "crop", "start": 500, "stop": 780}]))
    return path / "preprocess"


def test_denoising_loss_decreases_and_stage_round_trips(eels_stage, tmp_path):
    result = train_autoencoder(eels_stage, TrainConfig(epochs=8, **SMALL))
    train, val = result.history["train_loss"], result.history["val_loss"]
    assert train[-1] < 0.5 * train[0] and val[-1] < 0.7 * val[0], (train, val)
    stage = write_train_stage(ResultsStore(tmp_path / "r.zarr"), result)
    model, mean, scale = load_model(stage, (stage.feature.size,))
    for k, v in model.state_dict().items():
        assert (v == result.model.state_dict()[k]).all()
    assert stage.val_loss.dims == ("epoch",) and stage.attrs["train"]["config_hash"] == result.config.hash()


def test_split_is_by_spatial_tiles(eels_stage):
    stream = ChunkStream(eels_stage, TrainConfig(tile=8, val_fraction=0.25))
    split = np.concatenate([stream.split(*c) for c in stream.chunks])
    ny, nx = stream.nav_shape
    grid = np.zeros((ny, nx), np.int8)
    for (y0, y1, x0, x1), part in zip(stream.chunks, np.split(split, np.cumsum(
            [(c[1] - c[0]) * (c[3] - c[2]) for c in stream.chunks])[:-1])):
        grid[y0:y1, x0:x1] = part.reshape(y1 - y0, x1 - x0)
    tiles = grid.reshape(ny // 8, 8, nx // 8, 8)
    assert (tiles.min(axis=(1, 3)) == tiles.max(axis=(1, 3))).all()  # whole tiles
    assert 0 < grid.mean() < 1


def test_resume_after_a_kill_ends_identical(eels_stage, tmp_path):
    config = TrainConfig(epochs=4, **SMALL)
    straight = train_autoencoder(eels_stage, config, checkpoint_dir=tmp_path / "a")
    train_autoencoder(eels_stage, config, checkpoint_dir=tmp_path / "b", stop_after_epoch=1)
    resumed = train_autoencoder(eels_stage, config, checkpoint_dir=tmp_path / "b")
    assert resumed.resumed_from == 1
    for k, v in straight.model.state_dict().items():
        assert (v == resumed.model.state_dict()[k]).all(), k
    assert straight.history["val_loss"] == resumed.history["val_loss"]
    with pytest.raises(ConfigError, match="another training config"):
        train_autoencoder(eels_stage, TrainConfig(epochs=5, **SMALL), checkpoint_dir=tmp_path / "b")


class _Poison:
    def __reduce__(self):
        import os

        return os.system, ("touch pwned",)


@pytest.mark.parametrize("content", ["poisoned", "truncated"])
def test_an_unloadable_checkpoint_is_set_aside_never_run(eels_stage, tmp_path, monkeypatch,
                                                         caplog, content):
    import torch

    monkeypatch.chdir(tmp_path)
    config = TrainConfig(epochs=2, **SMALL)
    ckpt = tmp_path / "b" / "checkpoint.pt"
    ckpt.parent.mkdir()
    if content == "poisoned":
        torch.save({"model": _Poison()}, ckpt)
    else:
        train_autoencoder(eels_stage, config, checkpoint_dir=tmp_path / "b", stop_after_epoch=0)
        ckpt.write_bytes(ckpt.read_bytes()[:500])
    with caplog.at_level("WARNING", logger="emscale.trainer"):
        result = train_autoencoder(eels_stage, config, checkpoint_dir=tmp_path / "b")
    assert not (tmp_path / "pwned").exists()
    assert result.resumed_from is None and len(result.history["val_loss"]) == 2
    aside = list(ckpt.parent.glob("checkpoint.pt.unreadable-*"))
    assert len(aside) == 1 and aside[0].name in caplog.text and "weights_only=False" not in caplog.text


def test_linear_autoencoder_recovers_the_pca_subspace(tmp_path):
    rng = np.random.default_rng(0)
    n, f, k = 48 * 48, 16, 3
    basis = np.linalg.qr(rng.normal(size=(f, k)))[0].T
    x = (5 + (rng.normal(size=(n, k)) * [4, 3, 2]) @ basis + 0.05 * rng.normal(size=(n, f)))
    x = x.astype(np.float32).reshape(48, 48, f)
    ds = xr.Dataset({"features": (("y", "x", "energy"), da.from_array(x, chunks=(12, 48, f))),
                     "valid": (("y", "x"), da.ones((48, 48), bool, chunks=(12, 48)))})
    results = ResultsStore(tmp_path / "r.zarr")
    results.write_stage("preprocess", ds)
    config = TrainConfig(model="linear", latent_dim=k, objective="plain", epochs=60, lr=1e-2,
                         batch_size=128, threads=2, patience=60)
    result = train_autoencoder(tmp_path / "r.zarr" / "preprocess", config)
    decoder = result.model.decoder.weight.detach().numpy().astype(np.float64)  # (f, k)
    stream = ChunkStream(tmp_path / "r.zarr" / "preprocess", config)
    train_x = np.concatenate([stream.read(c, 0)[0] for c in stream.chunks]).astype(np.float64)
    _, _, vt = np.linalg.svd(train_x - train_x.mean(0), full_matrices=False)
    angle = subspace_angles(decoder, vt[:k].T).max()
    assert angle < 0.02, angle


def test_the_trimmed_loss_does_not_learn_a_rare_population(tmp_path):
    """6 % of the pixels (a square of the map) lie off the normal plane: a plain linear
    autoencoder with a spare dimension (k = 3) learns them too, after the normal plane (their
    spread is smaller); with ``trim`` they are out of the loss from the second epoch and keep a
    large error. (Learnt within the first epoch, before there is a cut, they stay learnt: at lr
    1e-2 here both end alike.)"""
    rng = np.random.default_rng(1)
    n, f = 48 * 48, 16
    basis = np.linalg.qr(rng.normal(size=(f, 3)))[0].T
    x = 5 + (rng.normal(size=(n, 2)) * [4, 3]) @ basis[:2] + 0.05 * rng.normal(size=(n, f))
    rare = np.zeros((48, 48), bool)
    rare[30:42, 6:18] = True
    x[rare.ravel()] += 10 * basis[2]
    x = x.astype(np.float32).reshape(48, 48, f)
    ds = xr.Dataset({"features": (("y", "x", "energy"), da.from_array(x, chunks=(12, 48, f))),
                     "valid": (("y", "x"), da.ones((48, 48), bool, chunks=(12, 48)))})
    ResultsStore(tmp_path / "r.zarr").write_stage("preprocess", ds)
    angles, errors = {}, {}
    for trim in (0.0, 0.1):
        config = TrainConfig(model="linear", latent_dim=3, objective="plain", epochs=40, lr=5e-3,
                             batch_size=128, threads=2, patience=40, tile=4, trim=trim)
        result = train_autoencoder(tmp_path / "r.zarr" / "preprocess", config)
        decoder = result.model.decoder.weight.detach().numpy().astype(np.float64)
        # how far the rare direction is from the learned subspace (pi/2: not learned at all)
        angles[trim] = subspace_angles(decoder, basis[2:3].T).max()
        import torch

        with torch.no_grad():
            flat = torch.as_tensor((x.reshape(n, f) - result.mean) / result.scale)
            err = ((result.model(flat)[0] - flat) ** 2).mean(1).numpy()
        errors[trim] = err[rare.ravel()].mean() / err[~rare.ravel()].mean()
        assert (len(result.history["trim_threshold"]) == len(result.history["val_loss"])) == bool(trim)
    assert angles[0.0] < 0.1 and angles[0.1] > 0.3, angles
    assert errors[0.1] > 50 * errors[0.0], errors


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_variational_autoencoder_trains_resumes_and_encodes_its_mean(eels_stage, tmp_path, model):
    """The KL term is in the loss, codes are drawn around their mean in training only (the
    mean is the code), a killed run resumes identical, and the stage rebuilds the same model."""
    import torch

    if model == "conv":
        from emscale.synth.diffraction import synth_diffraction

        import dask

        scan = synth_diffraction((16, 16), pattern=(64, 64), seed=2,
                                 policy=ChunkPolicy(target_mib=0.5))
        results = ResultsStore(tmp_path / "c.zarr")
        with dask.config.set(scheduler="synchronous"):
            write_preprocess_stage(results, scan, Preprocessor([{"step": "bin", "factor": 2}]))
        stage = results.path / "preprocess"
        kw = dict(model="conv", widths=(8, 16), latent_dim=3, threads=2, batch_size=32,
                  val_fraction=0.25, tile=4)
    else:
        stage, kw = eels_stage, SMALL
    config = TrainConfig(epochs=4, variational=True, kl_weight=1.0, **kw)
    straight = train_autoencoder(stage, config, checkpoint_dir=tmp_path / "a")
    train_autoencoder(stage, config, checkpoint_dir=tmp_path / "b", stop_after_epoch=1)
    resumed = train_autoencoder(stage, config, checkpoint_dir=tmp_path / "b")
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    net = straight.model
    assert net.variational and "log_var.weight" in net.state_dict()
    x = torch.as_tensor(ChunkStream(stage, config).validation_set()[0][:64])
    x = (x - torch.as_tensor(straight.mean)) / straight.scale
    with torch.no_grad():
        rec, z = net(x)
        assert torch.equal(z, net.encode(x)) and torch.equal(rec, net.decode(z))  # eval: the mean
        assert net.kl.shape == (len(x),) and (net.kl >= 0).all() and net.kl.mean() > 0.01
        net.train()
        net.generator = torch.Generator().manual_seed(0)
        rec_drawn, z_train = net(x)
        assert torch.equal(z_train, z) and not torch.equal(rec_drawn, rec)  # decoded a draw
    net.eval()
    out = write_train_stage(ResultsStore(tmp_path / "r.zarr"), straight)
    rebuilt, _, _ = load_model(out, ChunkStream(stage, config).signal_shape)
    with torch.no_grad():
        assert torch.allclose(rebuilt.encode(x), z)
    with pytest.raises(ConfigError, match="train.variational"):
        TrainConfig.of("train", model="linear", variational=True)


@pytest.mark.parametrize("overrides, field", [
    (dict(latent_dim=112), "latent_dim"), (dict(epochs=0), "epochs"), (dict(loss="l1"), "loss"),
    (dict(batch_size=-1), "batch_size"), (dict(val_fraction=1.0), "val_fraction"),
    (dict(model="transformer"), "model"), (dict(device="tpu"), "device"), (dict(trim=0.5), "trim"),
])
def test_bad_settings_name_the_field(eels_stage, overrides, field):
    with pytest.raises(ConfigError, match=f"train.{field}"):
        train_autoencoder(eels_stage, TrainConfig(**{**SMALL, **overrides}))


def test_store_without_preprocess_stage_is_refused(tmp_path):
    ResultsStore(tmp_path / "r.zarr").create()
    with pytest.raises(StoreError, match="no preprocess stage"):
        train_autoencoder(tmp_path / "r.zarr" / "preprocess", TrainConfig(**SMALL))


def test_training_runs_in_one_worker_of_the_cluster(eels_stage, local_client):
    from emscale.trainer import train_on_cluster

    import torch

    result = train_on_cluster(local_client, eels_stage, TrainConfig(epochs=2, **SMALL))
    # device auto: CUDA where the worker sees it; the model comes back on the CPU either way
    assert result.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert len(result.history["train_loss"]) == 2
    assert {p.device.type for p in result.model.parameters()} == {"cpu"}


def test_conv_autoencoder_on_diffraction_patterns(tmp_path):
    import dask

    from emscale.synth.diffraction import synth_diffraction

    scan = synth_diffraction((16, 16), pattern=(64, 64), seed=2, policy=ChunkPolicy(target_mib=0.5))
    results = ResultsStore(tmp_path / "r.zarr")
    with dask.config.set(scheduler="synchronous"):
        write_preprocess_stage(results, scan, Preprocessor([{"step": "bin", "factor": 2},
                                                            {"step": "scale", "method": "sqrt"}]))
    config = TrainConfig(model="conv", latent_dim=6, widths=(8, 16), epochs=4, batch_size=32,
                         val_fraction=0.25, tile=4, threads=2)
    result = train_autoencoder(results.path / "preprocess", config)
    assert result.history["train_loss"][-1] < result.history["train_loss"][0]
    stage = write_train_stage(results, result)
    model, _, _ = load_model(stage, (32, 32))
    import torch

    out, z = model(torch.zeros(3, 32 * 32))
    assert out.shape == (3, 32 * 32) and z.shape == (3, 6)


def test_poisson_loss_and_self_supervised_noise(tmp_path):
    """Raw counts (no clean target used): Poisson NLL with binomial thinning of the input."""
    import dask

    scan = synth_eels((32, 32), channels=128, seed=5, policy=ChunkPolicy(target_mib=0.1))
    results = ResultsStore(tmp_path / "r.zarr")
    with dask.config.set(scheduler="synchronous"):
        write_preprocess_stage(results, scan.drop_vars("clean"), Preprocessor([]))
    for noise in ("poisson", "gaussian"):
        config = TrainConfig(loss="poisson", noise=noise, noise_level=0.5, epochs=6, **SMALL)
        result = train_autoencoder(results.path / "preprocess", config)
        assert result.history["val_loss"][-1] < result.history["val_loss"][0], noise
    with pytest.raises(ConfigError, match="train.noise"):
        train_autoencoder(results.path / "preprocess", TrainConfig(noise="clean", **SMALL))


def test_max_train_pixels_takes_a_regular_grid(eels_stage):
    full = ChunkStream(eels_stage, TrainConfig())
    capped = ChunkStream(eels_stage, TrainConfig(max_train_pixels=300))
    n_full = sum(len(full.read(c, 0)[0]) for c in full.chunks)
    n_capped = sum(len(capped.read(c, 0)[0]) for c in capped.chunks)
    assert n_capped <= 300 < n_full and n_capped > 100


def test_a_training_set_within_resident_mib_is_decoded_once_and_gives_the_same_batches(
        eels_stage, monkeypatch):
    """Under ``resident_mib`` the training pixels are read and decoded once, not every epoch;
    the epochs draw the same batches as when they are streamed."""
    config = TrainConfig(buffer_chunks=1, **SMALL)
    counts, drawn = {}, {}
    for budget in (1024, 0):
        stream = ChunkStream(eels_stage, config.model_copy(update={"resident_mib": budget}))
        assert len(stream.chunks) > 2
        reads, read_into = [], stream._read_into
        monkeypatch.setattr(stream, "_read_into", lambda *a: (reads.append(1), read_into(*a)))
        for epoch in (0, 1):
            drawn[budget, epoch] = [b.numpy() for b, _ in stream.batches(0, epoch, 64)]
            counts[budget, epoch] = len(reads)
    for epoch in (0, 1):
        assert all(np.array_equal(a, b) for a, b in zip(drawn[1024, epoch], drawn[0, epoch]))
        assert len(drawn[1024, epoch]) == len(drawn[0, epoch])
    assert not np.array_equal(drawn[0, 0][0], drawn[0, 1][0])  # shuffled by epoch
    assert counts[1024, 1] == counts[1024, 0] > 0       # nothing read in the second epoch
    assert counts[0, 1] == 2 * counts[0, 0]              # streamed: read again
    assert TrainConfig(resident_mib=0).hash() == TrainConfig().hash()


def test_split_fraction_and_seed(tmp_path):
    feats = xr.Dataset({"features": (("y", "x", "energy"),
                                     da.zeros((256, 256, 4), np.float32, chunks=(64, 256, 4)))})
    results = ResultsStore(tmp_path / "r.zarr")
    results.write_stage("preprocess", feats)
    fractions, splits = [], []
    for seed in (0, 1):
        stream = ChunkStream(results.path / "preprocess", TrainConfig(tile=8, val_fraction=0.25), seed=seed)
        split = np.concatenate([stream.split(*c) for c in stream.chunks])
        fractions.append(split.mean())
        splits.append(split)
    assert all(abs(f - 0.25) < 0.05 for f in fractions), fractions  # 1024 tiles
    assert (splits[0] != splits[1]).any()


def test_resume_identical_when_the_scan_fits_in_the_buffer(eels_stage, tmp_path):
    config = TrainConfig(epochs=3, buffer_chunks=64, **SMALL)
    straight = train_autoencoder(eels_stage, config, checkpoint_dir=tmp_path / "a")
    train_autoencoder(eels_stage, config, checkpoint_dir=tmp_path / "b", stop_after_epoch=0)
    resumed = train_autoencoder(eels_stage, config, checkpoint_dir=tmp_path / "b")
    for k, v in straight.model.state_dict().items():
        assert (v == resumed.model.state_dict()[k]).all(), k


@pytest.mark.parametrize("overrides, field", [
    (dict(noise_level="x"), "noise_level"), (dict(noise_level=float("nan")), "noise_level"),
    (dict(prefetch="sometimes"), "prefetch"), (dict(val_fraction=None), "val_fraction"),
    (dict(widths=(16, 0)), "widths"), (dict(loss="poisson", model="linear"), "loss"),
    (dict(noise="poisson", noise_level=1.5), "noise_level"), (dict(seed=1), "seed"),
])
def test_more_bad_settings(overrides, field):
    with pytest.raises(ConfigError, match=rf"train\.{field}"):
        TrainConfig(**overrides)


@pytest.mark.parametrize("region", [(10, 5, 0, 8), (0, 8), (-1, 4, 0, 4)])
def test_a_bad_normal_region_is_refused_naming_it(region):
    from emscale.stages.anomaly import AnomalyConfig

    with pytest.raises(ConfigError, match=r"anomaly\.normal_region"):
        AnomalyConfig(normal_region=region)


def test_training_only_on_a_declared_normal_region(eels_stage):
    """Pixels outside ``normal_region`` are neither trained on nor validated on."""
    config = TrainConfig(tile=8, epochs=1, **SMALL)
    stream = ChunkStream(eels_stage, config, normal_region=(0, 24, 0, 40))
    for (y0, y1, x0, x1) in stream.chunks:
        part = stream.split(y0, y1, x0, x1).reshape(y1 - y0, x1 - x0)
        yy = np.arange(y0, y1)[:, None] + np.zeros(x1 - x0, int)
        assert (part[yy >= 24] == 2).all()
        assert (part[yy < 24] < 2).all()
    n_train = sum(int(stream.selection(c, 0).sum()) for c in stream.chunks)
    assert 0 < n_train < 24 * 40
    result = train_autoencoder(eels_stage, config, normal_region=(0, 24, 0, 40))
    assert len(result.history["train_loss"]) == 1
    # a small region still gets validation tiles of its own, whatever the seed
    for seed in range(12):
        small = TrainConfig(tile=4, val_fraction=0.1, **SMALL)
        stream = ChunkStream(eels_stage, small, seed=seed, normal_region=(0, 8, 0, 40))
        n_val = sum(int(stream.selection(c, 1).sum()) for c in stream.chunks)
        n_train = sum(int(stream.selection(c, 0).sum()) for c in stream.chunks)
        assert n_val > 0 and n_train > n_val, seed
    # a region of two tiles gets one of each; a region within one tile is refused up front
    for seed in range(12):
        two = TrainConfig(tile=8, val_fraction=0.5, **SMALL)
        stream = ChunkStream(eels_stage, two, seed=seed, normal_region=(0, 8, 0, 16))
        parts = [sum(int(stream.selection(c, p).sum()) for c in stream.chunks) for p in (0, 1)]
        assert parts == [64, 64], (seed, parts)
    with pytest.raises(ConfigError, match="normal_region: .* a single train.tile tile"):
        ChunkStream(eels_stage, TrainConfig(tile=8, **SMALL), normal_region=(0, 4, 0, 4))


def test_the_gathered_training_set_is_the_grid_of_the_stage_with_the_same_split(eels_stage,
                                                                             tmp_path):
    """The train stage trains on a small store gathered once: the features at every s-th pixel,
    split by the scan's tiles exactly as streaming the whole stage would split them."""
    from emscale.results import _open
    from emscale.train_stream import gather_training_set

    stage = _open(eels_stage)
    config = TrainConfig(max_train_pixels=300, tile=8, val_fraction=0.25)
    path = gather_training_set(stage, config, tmp_path / "set.zarr")
    gathered, full = ChunkStream(path, config), ChunkStream(eels_stage, config)
    assert gathered.step == 3 and gathered.stride == 1  # 48 x 40 px, 0.75 train: s = 3
    feats = stage["features"].values
    np.testing.assert_array_equal(gathered.features[:], feats[::3, ::3])

    def picked(stream, part):
        rows = [stream.read(c, part)[0] for c in stream.chunks]
        return {tuple(r) for r in np.concatenate(rows).round(6)}

    # training pixels: the same grid as the full stream's; validation: its tiles on the grid
    assert picked(gathered, 0) == picked(full, 0)
    assert picked(gathered, 1) <= picked(full, 1) and picked(gathered, 1)
    assert gather_training_set(stage, config, path) == path  # kept: reused, not redone


def test_the_gathered_set_of_a_normal_region_has_the_region_s_grid_pixels(eels_stage, tmp_path):
    from emscale.results import _open
    from emscale.train_stream import gather_training_set

    stage, region = _open(eels_stage), (9, 40, 3, 37)
    config = TrainConfig(max_train_pixels=200, tile=8, val_fraction=0.25)
    path = gather_training_set(stage, config, tmp_path / "set.zarr", normal_region=region)
    gathered = ChunkStream(path, config, normal_region=region)
    full = ChunkStream(eels_stage, config, normal_region=region)
    assert gathered.step == full.stride > 1 and gathered.origin == (9 + (-9) % full.stride,
                                                                    3 + (-3) % full.stride)

    def positions(stream, part):
        out = set()
        for y0, y1, x0, x1 in stream.chunks:
            sel = stream.split(y0, y1, x0, x1) == part
            yy, xx = np.mgrid[y0:y1, x0:x1]
            yy, xx = stream.origin[0] + stream.step * yy, stream.origin[1] + stream.step * xx
            out |= set(zip(yy.ravel()[sel], xx.ravel()[sel]))
        return out

    train = positions(gathered, 0)
    assert train and all(9 <= y < 40 and 3 <= x < 37 for y, x in train)
    assert all(y % gathered.step == 0 and x % gathered.step == 0 for y, x in train)


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_the_pca_path_starts_at_pca_and_only_improves_on_it(eels_stage, tmp_path, model):
    """With ``pca_path`` the untrained model is exactly PCA at latent_dim (its codes the PCA
    scores, its reconstruction PCA's), training lowers the loss from there, and the encode
    stage's numpy evaluator gives the torch module's codes."""
    import dask
    import torch
    from sklearn.decomposition import PCA

    from emscale.model_spec import ModelSpec
    from emscale.models import build_model
    from emscale.stages.encode import DenseInference

    if model == "conv":
        from emscale.synth.diffraction import synth_diffraction

        scan = synth_diffraction((16, 16), pattern=(64, 64), seed=2,
                                 policy=ChunkPolicy(target_mib=0.5))
        results = ResultsStore(tmp_path / "c.zarr")
        with dask.config.set(scheduler="synchronous"):
            write_preprocess_stage(results, scan, Preprocessor([{"step": "bin", "factor": 2},
                                                                {"step": "scale", "method": "sqrt"}]))
        stage = results.path / "preprocess"
        kw = dict(model="conv", widths=(8, 16), latent_dim=3, threads=2, batch_size=32,
                  val_fraction=0.25, tile=4)
    else:
        stage, kw = eels_stage, SMALL
    config = TrainConfig(epochs=4 if model == "mlp" else 12, pca_path=True, objective="plain",
                         **kw)
    stream = ChunkStream(stage, config)
    mean, scale = stream.moments()
    x = np.concatenate([b.numpy().copy() for b, _ in stream.batches(0, None, 4096)])
    xs = (x - mean) / scale
    shape = stream.signal_shape if model == "conv" else (stream.n_features,)
    net = build_model(config.model, shape, config.latent_dim, config.widths, pca_path=True)
    components = stream.principal_components(config.latent_dim, mean, scale, 0)
    net.start_at_pca(torch.from_numpy(components))
    with torch.no_grad():
        rec, z = net(torch.from_numpy(xs))
    assert np.allclose(z.numpy(), xs @ components.T, atol=1e-4)
    assert np.allclose(rec.numpy(), (xs @ components.T) @ components, atol=1e-4)
    # the components are the PCA's (the same subspace as scikit-learn's exact PCA)
    pca = PCA(config.latent_dim).fit(xs)
    assert np.degrees(subspace_angles(components.T, pca.components_.T)).max() < 1.0
    pca_mse = float((((xs @ components.T) @ components - xs) ** 2).mean())

    result = train_autoencoder(stage, config)
    with torch.no_grad():
        trained = float(((result.model(torch.from_numpy(xs))[0].numpy() - xs) ** 2).mean())
    # the training pixels' loss falls under PCA's; the model kept (the best validation epoch: on
    # a 16 x 16 scan the first) stays at PCA's level
    assert result.history["train_loss"][-1] < pca_mse and trained < 1.01 * pca_mse, \
        (result.history, trained, pca_mse)
    out = write_train_stage(ResultsStore(tmp_path / "r.zarr"), result)
    spec = ModelSpec.from_train_stage(out, stream.signal_shape)
    with torch.no_grad():
        codes = spec.model().encode(torch.from_numpy(xs[:64])).numpy()
        assert np.allclose(codes, result.model.encode(torch.from_numpy(xs[:64])).numpy(),
                           atol=1e-5)
    if model == "mlp":
        dense = DenseInference(spec)
        assert np.allclose(dense.encode(x[:64]), codes, atol=1e-3)
        with torch.no_grad():
            back = spec.model().decode(torch.from_numpy(codes)).numpy() * spec.scale + spec.mean
        assert np.allclose(dense.decode(codes), back, atol=1e-3)
    with pytest.raises(ConfigError, match="train.pca_path"):
        TrainConfig.of("train", model="linear", pca_path=True)
