import json

from emscale.cli import main
from emscale.store import ChunkPolicy, write_scan
from emscale.synth.eels import synth_eels


def test_bench_pca_writes_the_table_and_json(tmp_path, capsys):
    store = tmp_path / "scan.zarr"
    write_scan(synth_eels((24, 16), channels=64, seed=2), store, policy=ChunkPolicy(target_mib=0.02))
    out = tmp_path / "bench.json"
    code = main(["bench", "pca", str(store), "--methods", "gram,randomized,sklearn-ipca-loop",
                 "--k", "3", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "read+decompress floor" in printed and "gram" in printed
    figures = json.loads(out.read_text())
    assert figures["floor_gb_per_s"] > 0
    rows = {r["method"]: r for r in figures["rows"]}
    assert set(rows) == {"gram", "randomized", "sklearn-ipca-loop"}
    for r in rows.values():
        assert set(r) == {"method", "seconds", "gb_per_s", "peak_worker_mem_gb",
                          "max_principal_angle_rad"}
        assert r["seconds"] > 0 and r["peak_worker_mem_gb"] > 0
    assert rows["gram"]["max_principal_angle_rad"] < 1e-3  # exact method against exact float64


def test_bench_pca_rejects_unknown_method(tmp_path, capsys):
    store = tmp_path / "scan.zarr"
    write_scan(synth_eels((8, 8), channels=64, seed=2), store)
    assert main(["bench", "pca", str(store), "--methods", "magic"]) == 1
    assert "unknown method" in capsys.readouterr().err
