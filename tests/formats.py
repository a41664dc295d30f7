"""Writers of real raw files for the ingest tests (HyperSpy, py4DSTEM, numpy, zarr)."""

import numpy as np


def spectrum_data(shape=(9, 7, 64), seed=0, dtype=np.uint16):
    return np.random.default_rng(seed).poisson(30, shape).astype(dtype)


def diffraction_data(shape=(6, 5, 16, 18), seed=0, dtype=np.uint16):
    return np.random.default_rng(seed).poisson(10, shape).astype(dtype)


def hyperspy_spectrum(data, energy_offset=-0.2, energy_scale=0.01, nav_scale=2.5):
    import hyperspy.api as hs

    s = hs.signals.Signal1D(data)
    ax = s.axes_manager.signal_axes[0]
    ax.name, ax.units, ax.offset, ax.scale = "Energy", "keV", energy_offset, energy_scale
    for ax in s.axes_manager.navigation_axes:
        ax.units, ax.scale = "nm", nav_scale
    return s


def hyperspy_diffraction(data, q_scale=0.05, nav_scale=1.5):
    import hyperspy.api as hs

    s = hs.signals.Signal2D(data)
    for ax in s.axes_manager.signal_axes:
        ax.units, ax.scale, ax.offset = "1/nm", q_scale, -q_scale * ax.size / 2
    for ax in s.axes_manager.navigation_axes:
        ax.units, ax.scale = "nm", nav_scale
    return s


def py4dstem_file(path, data, r_pixel=2.5, q_pixel=0.1):
    from emscale.py4dstem_compat import import_py4dstem

    py4DSTEM = import_py4dstem()
    dc = py4DSTEM.DataCube(data=data)
    dc.calibration.set_R_pixel_size(r_pixel)
    dc.calibration.set_R_pixel_units("nm")
    dc.calibration.set_Q_pixel_size(q_pixel)
    dc.calibration.set_Q_pixel_units("A^-1")
    py4DSTEM.save(str(path), dc, mode="o")
