"""Encoded SOPs: the YAML, its loader, artifact schemas, registered checks and the run manifest."""

from sop.checks import CHECKS, RETRY_CHANGES, CheckContext, run_check
from sop.loader import DEFAULT_SOP, Sop, SopError, StageSpec, load_sop
from sop.manifest import Manifest, TamperedArtifactError, sha256_path
from sop.schemas import SCHEMAS, Spec

__all__ = [
    "CHECKS", "CheckContext", "DEFAULT_SOP", "Manifest", "RETRY_CHANGES", "SCHEMAS", "Sop", "SopError", "Spec",
    "StageSpec", "TamperedArtifactError", "load_sop", "run_check", "sha256_path",
]  # fmt: skip
