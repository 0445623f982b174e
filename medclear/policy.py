"""Loads the domain policy (designated institutions, ...) from data files into clearing.Policy."""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

from clearing.codes import InstitutionType
from clearing.model import Institution, Policy
from medclear.settings import Settings


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and line."""


def load_institutions(path: Path | None = None) -> dict[str, Institution]:
    """CSV columns: institution_id, name, type (HOSPITAL|CLINIC|PHARMACY), designated (1|0)."""
    text = (
        path.read_text(encoding="utf-8")
        if path is not None
        else resources.files("medclear.data").joinpath("institutions.csv").read_text("utf-8")
    )
    source = str(path or "medclear/data/institutions.csv")
    institutions: dict[str, Institution] = {}
    for line_no, row in enumerate(csv.DictReader(text.splitlines()), start=2):
        try:
            kind = InstitutionType[row["type"].strip().upper()]
            designated = row["designated"].strip() == "1"
            institution = Institution(
                row["institution_id"].strip(), row["name"].strip(), kind, designated
            )
        except (KeyError, AttributeError) as exc:
            raise PolicyError(f"{source}:{line_no}: bad institution row {row!r}") from exc
        if institution.institution_id in institutions:
            raise PolicyError(f"{source}:{line_no}: duplicate {institution.institution_id}")
        institutions[institution.institution_id] = institution
    return institutions


def load_policy(settings: Settings) -> Policy:
    return Policy(institutions=load_institutions(settings.institutions_file))
