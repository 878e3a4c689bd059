"""archfx.ir: the graph IR — capture, structure analysis, verification, lowering, saving."""

from .capture import capture
from .errors import (
    AnalysisError,
    ArchfxError,
    ArtifactError,
    CaptureError,
    LoweringError,
    ModelSpecError,
    PassError,
    PassFailure,
    VerificationError,
)
from .graph import Graph
from .inputs import Inputs

__all__ = [
    "AnalysisError",
    "ArchfxError",
    "ArtifactError",
    "CaptureError",
    "Graph",
    "Inputs",
    "LoweringError",
    "ModelSpecError",
    "PassError",
    "PassFailure",
    "VerificationError",
    "capture",
]
