"""The stage registry: one configuration per stage (the workflow's section is what the library
takes, with the same defaults), declared outputs, and a stage added by one module and one registry
line runs through the runner like the others."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import xarray as xr
import yaml
from pydantic import Field

from emscale.config import Section, defaults_of
from emscale.errors import ConfigError
from emscale.results import ResultsStore, layout_markdown
from emscale.runner import run_workflow
from emscale.stages import REGISTRY, Output, Stage, check_outputs
from emscale.workflow import defaults_yaml, validate_workflow

# ---------------------------------------------------------------------------------------------
# one configuration per stage


def _library_defaults(stage: Stage) -> dict:
    lib = stage.library
    if inspect.isclass(lib) and issubclass(lib, Section):  # the section is the library's config
        return {name: f.get_default(call_default_factory=True)
                for name, f in lib.model_fields.items()}
    params = inspect.signature(lib).parameters
    return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("stage", list(REGISTRY), ids=REGISTRY.names)
def test_every_field_has_one_default_in_the_library_the_schema_and_emscale_defaults(stage):
    section = defaults_of(stage.config)
    library = _library_defaults(stage)
    printed = yaml.safe_load(defaults_yaml())[stage.name]
    for name, default in section.items():
        as_json = yaml.safe_load(yaml.safe_dump(_plain(default)))
        assert printed[name] == as_json, f"emscale defaults: {stage.name}.{name}"
        if name in stage.not_in_library:
            assert name not in library
            continue
        assert name in library, f"{stage.library.__name__} has no parameter {name}"
        assert _plain(library[name]) == _plain(default), f"{stage.name}.{name}"
    # nothing the library takes is missing from the section (the seed comes from the workflow)
    assert set(library) - set(section) <= {"seed", "pca", "pca_scores", "spec", "features"}


def test_the_workflow_schema_is_the_stage_sections():
    wf = validate_workflow({"synth": {"kind": "eels"}})
    for stage in REGISTRY:
        assert type(wf.section(stage.name)) is stage.config
        assert wf.section(stage.name) == stage.config()


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def test_the_library_classes_check_with_the_sections_field_names():
    from emscale.stages.anomaly import AnomalyScorer
    from emscale.stages.cluster import PhaseClustering
    from emscale.stages.pca import PCA

    with pytest.raises(ConfigError, match="pca.solver"):
        PCA(solver="svd").fit(np.zeros((10, 4), np.float32))
    with pytest.raises(ConfigError, match="cluster.k_range"):
        PhaseClustering(k_range=(5, 3)).fit(np.zeros((10, 2), np.float32))
    with pytest.raises(ConfigError, match="anomaly.false_alarm_rate"):
        AnomalyScorer(false_alarm_rate=0.9)._check()
    with pytest.raises(ConfigError, match="not both"):
        AnomalyScorer(quantile=0.99, false_alarm_rate=0.01)._check()


def test_a_latent_size_beyond_the_pca_components_is_refused_up_front():
    with pytest.raises(ConfigError, match="pca.n_components"):
        validate_workflow({"synth": {"kind": "eels"}, "train": {"latent_dim": 20},
                           "pca": {"n_components": 16}})


def test_the_results_store_document_is_generated_from_the_declarations():
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "stores.md").read_text()
    assert layout_markdown() in doc, "docs/stores.md is stale: regenerate its results-store part"
    for stage in REGISTRY:
        for name in stage.outputs:
            assert f"`{name}`" in doc


def test_check_outputs_refuses_undeclared_variables_and_wrong_dims():
    stage = REGISTRY["anomaly"]
    good = xr.Dataset({k: (("y", "x"), np.zeros((2, 2))) for k in stage.outputs})
    check_outputs(stage, good)
    with pytest.raises(ConfigError, match="do not declare"):
        check_outputs(stage, good.assign(extra=(("y", "x"), np.zeros((2, 2)))))
    with pytest.raises(ConfigError, match="dims"):
        check_outputs(stage, good.assign(anomaly=(("x", "y"), np.zeros((2, 2)))))
    with pytest.raises(ConfigError, match="did not build"):
        check_outputs(stage, good.drop_vars("mahalanobis"))


# ---------------------------------------------------------------------------------------------
# a stage added by one module and one registry line (here: defined in this test module)


class PhaseAnomalyConfig(Section):
    """The extra stage's section."""

    min_fraction: float = Field(0.0, ge=0, le=1, description="phases below this share are "
                                "reported as minor")


def _phase_anomaly(ctx):
    """Per phase: its pixels and how many of them are flagged anomalous (lazy reductions)."""
    phase, flagged = ctx.input("cluster")["phase"], ctx.input("anomaly")["anomaly"]
    k = ctx.input("cluster").sizes["cluster"]
    ids = xr.DataArray(np.arange(k), dims="cluster")
    member = phase == ids
    pixels = member.sum(("y", "x"))
    ds = xr.Dataset({"phase_pixels": pixels,
                     "phase_flagged": (member & flagged).sum(("y", "x"))})
    share = pixels / pixels.sum()
    ds["phase_minor"] = share < ctx.config.min_fraction
    return ds


PHASE_ANOMALY = Stage(
    name="phase_anomaly", config=PhaseAnomalyConfig, reads=("cluster", "anomaly"),
    build=_phase_anomaly, about="pixels and flagged pixels per phase",
    outputs={"phase_pixels": Output(("cluster",), "pixels of the phase", "pixels"),
             "phase_flagged": Output(("cluster",), "of them flagged anomalous", "pixels"),
             "phase_minor": Output(("cluster",), "share below min_fraction")})

SMALL = {
    "synth": {"kind": "eels", "shape": [32, 32], "channels": 128, "anomaly": True, "seed": 3},
    "train": {"latent_dim": 3, "widths": [32, 16], "epochs": 2, "tile": 8, "threads": 1},
    "pca": {"n_components": 4},
    "cluster": {"k_range": [2, 4], "n_init": 2, "sample_size": 2000},
}


def test_an_extra_stage_runs_through_the_runner_like_the_others(tmp_path, local_client):
    registry = REGISTRY.with_stage(PHASE_ANOMALY)
    assert registry.names[-1] == "phase_anomaly" and "phase_anomaly" not in REGISTRY.names
    with pytest.raises(ConfigError, match="phase_anomaly"):  # not a section of emscale's own
        validate_workflow({**SMALL, "phase_anomaly": {}})
    with pytest.raises(ConfigError, match="phase_anomaly: the workflow has no section"):
        run_workflow(validate_workflow({**SMALL, "output": str(tmp_path / "no")}),
                     registry=registry)  # refused before anything runs
    assert not (tmp_path / "no").exists()
    data = {**SMALL, "output": str(tmp_path / "out"), "phase_anomaly": {"min_fraction": 0.05}}
    wf = validate_workflow(data, registry=registry)
    assert "phase_anomaly:" in defaults_yaml(registry)

    said = []
    result = run_workflow(wf, registry=registry, echo=said.append)
    assert result.ran == ["scan", "preprocess", "pca", "train", "encode", "anomaly", "cluster",
                          "phase_anomaly", "report"]
    results = ResultsStore(result.results)
    extra = results.open_stage("phase_anomaly")
    phase = results.open_stage("cluster")["phase"].values
    flagged = results.open_stage("anomaly")["anomaly"].values
    for i in range(extra.sizes["cluster"]):
        assert int(extra["phase_pixels"][i]) == int((phase == i).sum())
        assert int(extra["phase_flagged"][i]) == int(((phase == i) & flagged).sum())
    assert results.stage_attrs("phase_anomaly")["config_hash"]
    assert "[phase_anomaly] running" in said

    # cached like any stage; a change of its section reruns it alone; --force knows its name
    # (without the report: it is redone after any stage, as test_runner shows, in 6 s here)
    assert run_workflow(wf, registry=registry, echo=print).ran == []
    changed = validate_workflow({**data, "phase_anomaly": {"min_fraction": 0.5}},
                                registry=registry)
    assert run_workflow(changed, registry=registry, echo=print,
                        report=False).ran == ["phase_anomaly"]
    forced = run_workflow(changed, registry=registry, force=("phase_anomaly",), echo=print,
                          report=False)
    assert forced.ran == ["phase_anomaly"]


def test_a_stage_reading_a_later_stage_is_refused():
    bad = Stage(name="early", config=PhaseAnomalyConfig, reads=("nothing",), build=_phase_anomaly,
                about="", outputs={})
    with pytest.raises(ValueError, match="not an earlier stage"):
        REGISTRY.with_stage(bad, after="pca")
