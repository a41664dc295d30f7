import json
import subprocess
import sys

import numpy as np
import pytest

from emscale.cli import main


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_every_command_explains_itself(capsys):
    for cmd in ([], ["synth"], ["synth", "eels"], ["synth", "4dstem"], ["ingest"], ["info"],
                ["bench"], ["bench", "ingest"]):
        code, out, _ = run(capsys, *cmd, "--help")
        assert code == 0 and "Usage" in out and len(out) > 200, cmd


def test_console_script_installed():
    proc = subprocess.run([sys.executable, "-m", "emscale", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "synth" in proc.stdout


def test_help_loads_no_scientific_library():
    """``emscale --help`` stays quick: the command line imports dask, xarray, zarr and torch only
    in the commands that use them (``import emscale`` is lazy too)."""
    heavy = ["dask", "xarray", "zarr", "torch", "numpy", "distributed"]
    code = ("import sys, emscale, emscale.cli; from emscale.cli import main; main(['--help']); "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_verbose_and_debug_after_the_command(tmp_path, capsys):
    assert run(capsys, "defaults", "-v")[0] == 0
    code, _, err = run(capsys, "info", str(tmp_path / "none.zarr"), "--debug")
    assert code == 1 and "Traceback" in err and "no such scan store" in err


def test_a_workflow_file_gets_all_its_errors_in_plain_words(tmp_path, capsys):
    wf = tmp_path / "wf.yaml"
    wf.write_text("synth: {kind: eels, shape: [16, 16]}\n"
                  "train: {epoch: 3, latent_dim: 0}\n"
                  "pca: {n_componets: 4}\n"
                  "cluster: {method: kmean}\n"
                  "preprocess:\n  steps:\n    - {step: normalise, method: summ}\n"
                  "    - {step: crop, start: 500, stopp: 700}\n    - {step: centr}\n")
    code, _, err = run(capsys, "run", str(wf))
    assert code == 1 and len(err.strip().splitlines()) == 1
    for said in ["pca.n_componets: unknown field (did you mean 'n_components'?)",
                 "train.epoch: unknown field (did you mean 'epochs'?)",
                 "train.latent_dim: must be at least 1, got 0",
                 "cluster.method: must be one of kmeans, gmm, got 'kmean' (did you mean 'kmeans'?)",
                 "preprocess.steps[1].stopp: unknown parameter of step 'crop' (did you mean 'stop'?)",
                 "preprocess.steps[2].step: must be one of ",
                 "(did you mean 'centre'?)"]:
        assert said in err, said
    assert "Input should" not in err and "Extra inputs" not in err


def test_both_spellings_of_step_names(tmp_path):
    from emscale.stages.preprocess import Preprocessor

    british = Preprocessor([{"step": "normalise"}, {"step": "centre"}])._check(None)
    american = Preprocessor([{"step": "normalize"}, {"step": "center"}])._check(None)
    assert [s.name for s in british] == [s.name for s in american] == ["normalize", "centre"]
    chosen = Preprocessor([{"step": "normalise", "method": "summ"}])
    with pytest.raises(Exception, match=r"method: must be one of .*got 'summ' \(did you mean 'sum'\?\)"):
        chosen.check(None)


def test_synth_then_info_json(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    code, text, _ = run(capsys, "synth", "eels", str(out), "--shape", "12", "10", "--channels", "96",
                        "--anomaly", "--seed", "4", "--chunk-mib", "0.01")
    assert code == 0 and "wrote" in text
    code, text, _ = run(capsys, "info", str(out), "--json")
    info = json.loads(text)
    assert info["shape"] == [12, 10, 96] and info["kind"] == "spectrum"
    assert info["chunks"]["n_chunks"] > 1 and info["ground_truth"]
    assert info["calibrations"]["energy"]["units"] == "eV"
    assert info["attrs"]["generator"]["seed"] == 4
    code, text, _ = run(capsys, "info", str(out))
    assert code == 0 and "energy" in text and "Fe2O3" in text


def test_synth_4dstem(tmp_path, capsys):
    out = tmp_path / "d.zarr"
    code, _, _ = run(capsys, "synth", "4dstem", str(out), "--shape", "8", "8", "--pattern", "64", "64")
    assert code == 0
    code, text, _ = run(capsys, "info", str(out), "--json")
    assert json.loads(text)["dims"] == ["y", "x", "ky", "kx"]


def test_ingest_json_report(tmp_path, capsys):
    np.save(tmp_path / "raw.npy", np.ones((4, 5, 32), np.uint16))
    code, text, _ = run(capsys, "ingest", str(tmp_path / "raw.npy"), str(tmp_path / "s.zarr"), "--json")
    assert code == 0 and json.loads(text)["shape"] == [4, 5, 32]


@pytest.mark.parametrize("args, message", [
    (["ingest", "{tmp}/missing.npy", "{tmp}/o.zarr"], "missing.npy: no such file"),
    (["info", "{tmp}/missing.zarr"], "missing.zarr: no such scan store"),
    (["synth", "eels", "{tmp}/o.zarr", "--chunk-mib", "-1"], "chunk_mib"),
    (["synth", "4dstem", "{tmp}/o.zarr", "--pattern", "32", "32"], "pattern"),
])
def test_errors_are_one_line_without_traceback(tmp_path, capsys, args, message):
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in args])
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("emscale: error:") and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "o.zarr").exists()


def test_debug_shows_traceback(tmp_path, capsys):
    code, _, err = run(capsys, "--debug", "info", str(tmp_path / "missing.zarr"))
    assert code == 1 and "Traceback" in err


def test_usage_error_exit_code(capsys):
    code, _, err = run(capsys, "synth", "eels")
    assert code == 2 and "Missing argument" in err
