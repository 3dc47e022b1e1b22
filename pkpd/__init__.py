"""pkpd: pharmacometrics toolkit (model files, NONMEM dosing, fast exact PK, PyMC fits)."""

from .dataset import Dataset, DatasetError, read_nonmem, write_nonmem
from .fitting import fit
from .model import Model, ModelError, load_model, parse_model
from .nca import nca
from .regimen import Regimen, RegimenError
from .simulation import simulate, simulate_regimen

__version__ = "0.1.0"

__all__ = [
    "Dataset", "DatasetError", "Model", "ModelError", "Regimen", "RegimenError",
    "fit", "load_model", "nca", "parse_model", "read_nonmem", "simulate", "simulate_regimen",
    "write_nonmem",
]
