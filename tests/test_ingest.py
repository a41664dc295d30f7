import hashlib
import os

import numpy as np
import pytest
import zarr
from formats import (
    diffraction_data,
    hyperspy_diffraction,
    hyperspy_spectrum,
    py4dstem_file,
    spectrum_data,
)

from emscale.errors import InputError, OutputExistsError
from emscale.ingest import ingest, sha256_of
from emscale.store import ChunkPolicy, open_scan, write_scan

SMALL = ChunkPolicy(target_mib=0.01)  # a few pixels per chunk: every test crosses chunk borders


def fingerprint(path):
    return sha256_of(path), os.stat(path).st_mtime_ns


def ingest_checked(raw, out, **kwargs):
    """Ingest, and check the input was not modified and the store follows the contract."""
    before = fingerprint(raw)
    report = ingest(raw, out, policy=SMALL, **kwargs)
    assert fingerprint(raw) == before, "input modified"
    ds = open_scan(out)
    assert len(ds.signal.chunks[0]) > 1
    src = ds.attrs["source"]
    assert src["sha256"] == before[0] == report.sha256
    assert src["size"] > 0 and src["path"].endswith(raw.name)
    return ds, report


def coord_step(ds, dim):
    v = ds[dim].values
    return v[0], v[1] - v[0], ds[dim].attrs["units"]


def test_npy_spectrum_round_trip(tmp_path):
    data = spectrum_data()
    np.save(tmp_path / "raw.npy", data)
    ds, report = ingest_checked(tmp_path / "raw.npy", tmp_path / "s.zarr")
    assert ds.attrs["kind"] == "spectrum" and ds.signal.dtype == np.uint16
    np.testing.assert_array_equal(ds.signal.values, data)
    assert report.format == "npy" and report.shape == data.shape
    assert ds.energy.attrs["calibrated"] is False


@pytest.mark.parametrize("dtype, stored", [(np.int64, np.int32), (">u2", np.uint16),
                                           (">f4", np.float32), (np.uint64, np.uint32)])
def test_wide_or_byte_swapped_counts_converted(tmp_path, dtype, stored):
    """int64 / big-endian counts whose values fit are stored in the native, narrower type
    (they were refused, naming the output)."""
    data = spectrum_data().astype(dtype)
    np.save(tmp_path / "raw.npy", data)
    ds, _ = ingest_checked(tmp_path / "raw.npy", tmp_path / "s.zarr")
    assert ds.signal.dtype == stored
    assert ds.attrs["ingest"]["source_dtype"] == str(np.dtype(dtype))
    np.testing.assert_array_equal(ds.signal.values, data)


def test_npy_4d_round_trip(tmp_path):
    data = diffraction_data(dtype=np.float32)
    np.save(tmp_path / "raw.npy", data)
    ds, _ = ingest_checked(tmp_path / "raw.npy", tmp_path / "d.zarr")
    assert ds.signal.dims == ("y", "x", "ky", "kx") and ds.signal.dtype == np.float32
    np.testing.assert_array_equal(ds.signal.values, data)


def test_hspy_spectrum_keeps_calibration_with_negative_energy_start(tmp_path):
    data = spectrum_data()
    hyperspy_spectrum(data, energy_offset=-0.2, energy_scale=0.01, nav_scale=2.5).save(tmp_path / "si.hspy")
    ds, report = ingest_checked(tmp_path / "si.hspy", tmp_path / "s.zarr")
    np.testing.assert_array_equal(ds.signal.values, data)
    start, step, units = coord_step(ds, "energy")
    assert (start, units) == (pytest.approx(-0.2), "keV") and step == pytest.approx(0.01)
    assert coord_step(ds, "x") == (0.0, pytest.approx(2.5), "nm")
    assert report.format == "HSPY"


@pytest.mark.parametrize("ext", ["hspy", "emd", "blo"])
def test_rosettasciio_4dstem_round_trip(tmp_path, ext):
    data = diffraction_data(shape=(6, 5, 16, 16), dtype=np.uint8)
    hyperspy_diffraction(data, q_scale=0.05, nav_scale=1.5).save(tmp_path / f"d.{ext}")
    ds, _ = ingest_checked(tmp_path / f"d.{ext}", tmp_path / "d.zarr")
    assert ds.attrs["kind"] == "diffraction"
    np.testing.assert_array_equal(ds.signal.values, data)
    assert coord_step(ds, "y")[1] == pytest.approx(1.5)
    if ext != "blo":  # the blockfile format stores its own detector calibration
        assert coord_step(ds, "kx")[:2] == (pytest.approx(-0.4), pytest.approx(0.05))


def test_emd_spectrum_image(tmp_path):
    data = spectrum_data()
    hyperspy_spectrum(data).save(tmp_path / "si.emd")
    ds, _ = ingest_checked(tmp_path / "si.emd", tmp_path / "s.zarr")
    np.testing.assert_array_equal(ds.signal.values, data)
    assert coord_step(ds, "energy")[0] == pytest.approx(-0.2)


def test_py4dstem_file_read_lazily_with_calibration(tmp_path):
    data = diffraction_data()
    py4dstem_file(tmp_path / "dc.h5", data, r_pixel=2.5, q_pixel=0.1)
    ds, report = ingest_checked(tmp_path / "dc.h5", tmp_path / "d.zarr")
    np.testing.assert_array_equal(ds.signal.values, data)
    assert coord_step(ds, "x") == (0.0, pytest.approx(2.5), "nm")
    assert coord_step(ds, "kx") == (0.0, pytest.approx(0.1), "A^-1")
    assert ds.attrs["calibration"]["R_pixel_size"] == 2.5
    assert "EMD 1.0" in report.format


def test_reingest_of_a_scan_store_keeps_ground_truth(tmp_path):
    from emscale.synth.eels import synth_eels

    write_scan(synth_eels((10, 12), channels=96, seed=2), tmp_path / "a.zarr")
    ds, _ = ingest_checked(tmp_path / "a.zarr", tmp_path / "b.zarr")
    a = open_scan(tmp_path / "a.zarr")
    np.testing.assert_array_equal(ds.signal.values, a.signal.values)
    np.testing.assert_array_equal(ds.label.values, a.label.values)
    assert ds.attrs["phase_names"] == a.attrs["phase_names"]
    np.testing.assert_allclose(ds.energy.values, a.energy.values)


def test_bare_zarr_array(tmp_path):
    data = spectrum_data()
    zarr.create_array(str(tmp_path / "raw.zarr"), data=data, chunks=(3, 7, 64))
    ds, report = ingest_checked(tmp_path / "raw.zarr", tmp_path / "s.zarr")
    np.testing.assert_array_equal(ds.signal.values, data)


# --- bad input ----------------------------------------------------------------------------------

def assert_nothing_written(tmp_path, out="out.zarr"):
    assert not (tmp_path / out).exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("name, content, message", [
    ("scan.xyz", b"hello", "unknown format"),
    ("scan.npy", b"", "empty file"),
    ("scan.npy", b"\x93NUMPY garbage", "not a readable .npy"),
    ("scan.h5", os.urandom(4096), "scan.h5"),
    ("scan.dm4", os.urandom(4096), "scan.dm4"),
])
def test_unreadable_files_named(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=message):
        ingest(tmp_path / name, tmp_path / "out.zarr")
    assert_nothing_written(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        ingest(tmp_path / "nope.npy", tmp_path / "out.zarr")


def test_truncated_npy(tmp_path):
    np.save(tmp_path / "raw.npy", spectrum_data())
    raw = (tmp_path / "raw.npy").read_bytes()
    (tmp_path / "raw.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="truncated"):
        ingest(tmp_path / "raw.npy", tmp_path / "out.zarr")
    assert_nothing_written(tmp_path)


def test_truncated_hspy(tmp_path):
    hyperspy_spectrum(spectrum_data(shape=(30, 30, 256))).save(tmp_path / "si.hspy")
    raw = (tmp_path / "si.hspy").read_bytes()
    (tmp_path / "si.hspy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="si.hspy"):
        ingest(tmp_path / "si.hspy", tmp_path / "out.zarr", policy=SMALL)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("shape, message", [
    ((20, 30), "2-D array"),
    ((2, 3, 4, 5, 6), "5-D array"),
    ((0, 5, 8), "empty scan"),
])
def test_wrong_dims(tmp_path, shape, message):
    np.save(tmp_path / "raw.npy", np.zeros(shape, np.uint16))
    with pytest.raises(InputError, match=message):
        ingest(tmp_path / "raw.npy", tmp_path / "out.zarr")
    assert_nothing_written(tmp_path)


def test_single_spectrum_is_not_a_scan(tmp_path):
    import hyperspy.api as hs

    hs.signals.Signal1D(np.arange(64.0)).save(tmp_path / "one.hspy")
    with pytest.raises(InputError, match="one.hspy"):
        ingest(tmp_path / "one.hspy", tmp_path / "out.zarr")


def test_nonfinite_values_refused_with_the_chunk(tmp_path):
    data = spectrum_data(dtype=np.float32)
    data[7, 3, 10] = np.nan
    data[8, 0, 0] = np.inf
    np.save(tmp_path / "raw.npy", data)
    with pytest.raises(InputError, match=r"2 NaN/inf values, first in chunk \(1, 0\): y 5:9, x 0:7") as err:
        ingest(tmp_path / "raw.npy", tmp_path / "out.zarr", policy=SMALL)
    assert "raw.npy" in str(err.value)
    assert_nothing_written(tmp_path)
    report = ingest(tmp_path / "raw.npy", tmp_path / "out.zarr", policy=SMALL, allow_nonfinite=True)
    assert report.nonfinite == 2
    assert open_scan(tmp_path / "out.zarr").attrs["ingest"]["nonfinite"] == 2


def test_negative_counts_recorded(tmp_path):
    data = spectrum_data(dtype=np.float32) - 29.0
    np.save(tmp_path / "raw.npy", data)
    report = ingest(tmp_path / "raw.npy", tmp_path / "out.zarr", policy=SMALL)
    assert report.negative == int((data < 0).sum()) > 0
    assert open_scan(tmp_path / "out.zarr").attrs["ingest"]["negative"] == report.negative


def test_existing_output_untouched(tmp_path):
    np.save(tmp_path / "raw.npy", spectrum_data())
    (tmp_path / "out.zarr").mkdir()
    (tmp_path / "out.zarr" / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="out.zarr"):
        ingest(tmp_path / "raw.npy", tmp_path / "out.zarr")
    assert (tmp_path / "out.zarr" / "keep.txt").read_text() == "precious"


def test_sha256_matches_hashlib(tmp_path):
    (tmp_path / "f.bin").write_bytes(os.urandom(20000))
    assert sha256_of(tmp_path / "f.bin") == hashlib.sha256((tmp_path / "f.bin").read_bytes()).hexdigest()


@pytest.mark.parametrize("ext", ["hspy", "npy"])
def test_ingest_while_a_distributed_client_is_active(tmp_path, local_client, ext):
    # hspy: lazy h5py arrays, not picklable; npy: the file's hash travels along a chain of tasks
    data = spectrum_data()
    if ext == "hspy":
        hyperspy_spectrum(data).save(tmp_path / "si.hspy")
    else:
        np.save(tmp_path / "si.npy", data)
    ds, _ = ingest_checked(tmp_path / f"si.{ext}", tmp_path / "s.zarr")
    np.testing.assert_array_equal(ds.signal.values, data)


def test_npy_chunks_read_directly_and_buffered_are_the_same(tmp_path, monkeypatch):
    import emscale.readers as readers

    data = np.random.default_rng(3).integers(0, 60000, (37, 29, 33)).astype(np.uint16)
    np.save(tmp_path / "raw.npy", data)  # a 128-byte header: no chunk starts on a block boundary
    if readers._read_direct(str(tmp_path / "raw.npy"), 128, 4000) is None:
        pytest.skip("this file system refuses O_DIRECT (the buffered path is then the only one)")
    for chunks in (((37,), (29,), 33), ((10, 10, 10, 7), (29,), 33), ((5,) * 7 + (2,), (10, 19), 33)):
        for direct in (True, False):
            monkeypatch.setattr(readers, "DIRECT_READS", direct)
            raw = readers.read_npy(tmp_path / "raw.npy", lambda shape, c=chunks: c)
            np.testing.assert_array_equal(raw.data.compute(scheduler="threads"), data)


# --- calibrations and kind given on the command line; the workflow's NaN policy (issue 19) -------

def cli(capsys, *args):
    """``emscale ARGS`` in-process: (exit code, stdout, stderr)."""
    from emscale.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_axes_and_kind_of_a_raw_array(tmp_path, capsys):
    """--axis gives a .npy the calibrations a file read by rosettasciio has: coordinates
    offset + scale * i with units; --kind eds records the signal type."""
    data = spectrum_data()
    np.save(tmp_path / "raw.npy", data)
    code, out, err = cli(capsys, "ingest", tmp_path / "raw.npy", tmp_path / "s.zarr", "--kind", "eds",
                         "--axis", "energy:scale=0.01,offset=-0.2,units=keV",
                         "--axis", "y,x:scale=2.5,units=nm", "--chunk-mib", "0.01")
    assert code == 0, err
    ds = open_scan(tmp_path / "s.zarr")
    np.testing.assert_array_equal(ds.signal.values, data)
    np.testing.assert_allclose(ds.energy.values, -0.2 + 0.01 * np.arange(64))
    assert coord_step(ds, "energy")[2] == "keV" and "calibrated" not in ds.energy.attrs
    assert coord_step(ds, "y") == (0.0, pytest.approx(2.5), "nm") == coord_step(ds, "x")
    assert ds.attrs["signal_type"] == "EDS" and ds.attrs["kind"] == "spectrum"
    assert ds.attrs["ingest"]["axes_given"]["energy"] == {"scale": 0.01, "offset": -0.2, "units": "keV"}


def test_axis_replaces_a_files_calibration_keeping_keys_not_given(tmp_path, capsys):
    hyperspy_spectrum(spectrum_data(), energy_offset=-0.2, energy_scale=0.01).save(tmp_path / "si.hspy")
    code, _, err = cli(capsys, "ingest", tmp_path / "si.hspy", tmp_path / "s.zarr",
                       "--axis", "energy:offset=100,units=eV", "--axis", "x:units=um")
    assert code == 0, err
    ds = open_scan(tmp_path / "s.zarr")
    assert coord_step(ds, "energy") == (pytest.approx(100), pytest.approx(0.01), "eV")
    assert coord_step(ds, "x") == (0.0, pytest.approx(2.5), "um")


@pytest.mark.parametrize("args, message", [
    (["--axis", "z:scale=1"], "raw.npy: --axis z: no such axis (a spectrum image has axes y, x, energy)"),
    (["--axis", "ky:scale=1"], "--axis ky: no such axis"),
    (["--axis", "energy:scale=abc"], "--axis 'energy:scale=abc': scale 'abc' is not a number"),
    (["--axis", "energy:scale=0"], "scale must be positive"),
    (["--axis", "energy:offset=nan"], "offset 'nan' is not a finite number"),
    (["--axis", "energy:step=1"], "'step=1' is not KEY=VALUE with KEY one of scale, offset, units"),
    (["--axis", "energy"], "--axis 'energy': expected DIM:scale=S,offset=O,units=U"),
    (["--axis", "energy:units=eV", "--axis", "energy:scale=2"], "--axis energy: given twice"),
    (["--kind", "4dstem"], "raw.npy: --kind 4dstem: the file holds a spectrum image (y, x, energy)"),
    (["--kind", "image"], "--kind 'image': not one of spectrum, eels, eds, diffraction, 4dstem"),
    (["--allow-nonfinite", "--kind", "eels"], None),  # the check of the one that runs
])
def test_bad_calibration_or_kind_refused_naming_the_option(tmp_path, capsys, args, message):
    data = spectrum_data(dtype=np.float32)
    np.save(tmp_path / "raw.npy", data)
    code, _, err = cli(capsys, "ingest", tmp_path / "raw.npy", tmp_path / "out.zarr", *args)
    if message is None:
        assert code == 0 and open_scan(tmp_path / "out.zarr").attrs["signal_type"] == "EELS"
        return
    assert code == 1 and err.count("\n") == 1 and err.startswith("emscale: error: "), err
    assert message in err
    assert_nothing_written(tmp_path)


def test_nonfinite_remedy_names_the_option_of_the_command(tmp_path, capsys):
    data = spectrum_data(dtype=np.float32)
    data[2, 3, 4] = np.nan
    np.save(tmp_path / "raw.npy", data)
    code, _, err = cli(capsys, "ingest", tmp_path / "raw.npy", tmp_path / "out.zarr")
    assert code == 1 and "(use --allow-nonfinite to keep them" in err
    assert_nothing_written(tmp_path)


def test_run_and_batch_ingest_follow_the_workflows_nonfinite_policy(tmp_path):
    """The ingest that run and batch trigger keeps NaN/inf for preprocessing to mask
    (preprocess.nonfinite: mask, the default), and under 'error' its refusal names that field,
    not an option the command does not have."""
    import yaml

    from emscale.batch import run_batch
    from emscale.runner import run_workflow
    from emscale.workflow import load_workflow

    data = spectrum_data(dtype=np.float32)
    data[2, 3, 4] = np.inf
    np.save(tmp_path / "bad.npy", data)
    for policy in ("mask", "error"):
        (tmp_path / f"{policy}.yaml").write_text(yaml.safe_dump(
            {"preprocess": {"nonfinite": policy, "steps": []}, "train": {"tile": 4},
             "input": str(tmp_path / "bad.npy"),
             "output": str(tmp_path / policy)}))
    run_workflow(load_workflow(tmp_path / "mask.yaml"), until="scan", echo=lambda *a: None)
    ingested = open_scan(tmp_path / "mask" / "scan.zarr").attrs["ingest"]
    assert ingested["nonfinite"] == 1 and ingested["allow_nonfinite"] is True
    with pytest.raises(InputError) as err:
        run_workflow(load_workflow(tmp_path / "error.yaml"), until="scan", echo=lambda *a: None)
    message = str(err.value)
    assert "1 NaN/inf values" in message and "preprocess.nonfinite is 'error'" in message
    assert "--allow-nonfinite" not in message
    (tmp_path / "scans").mkdir()
    np.save(tmp_path / "scans" / "bad.npy", data)
    lines = []
    outcome = run_batch(tmp_path / "scans", tmp_path / "error.yaml", output_root=tmp_path / "batch",
                        echo=lines.append)
    assert len(outcome["failed"]) == 1
    failed = next(line for line in lines if "FAILED" in line)
    assert "preprocess.nonfinite is 'error'" in failed and "--allow-nonfinite" not in failed
