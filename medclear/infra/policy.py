"""Loads the domain policy (designated institutions, ...) from data files into clearing.Policy."""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

from clearing.codes import InstitutionType
from clearing.model import Institution, LifetimeUnit, Policy, PreLossLifetime
from medclear.errors import MedclearError
from medclear.infra.settings import Settings


class PolicyError(MedclearError, ValueError):
    """A policy file that cannot be used; the message names the file and line."""


def load_institutions(path: Path | None = None) -> dict[str, Institution]:
    """CSV columns: institution_id, name, type (HOSPITAL|CLINIC|PHARMACY), designated (1|0)."""
    text, source = _data_text(path, "institutions.csv")
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


def _data_text(path: Path | None, name: str) -> tuple[str, str]:
    if path is not None:
        return path.read_text(encoding="utf-8"), str(path)
    return resources.files("medclear.data").joinpath(name).read_text(
        "utf-8"
    ), f"medclear/data/{name}"


UNITS = {LifetimeUnit.SECONDS, LifetimeUnit.HOURS, LifetimeUnit.DAYS, LifetimeUnit.WORKING_DAYS}


def load_pre_loss_lifetimes(path: Path | None = None) -> dict[str, PreLossLifetime]:
    """CSV columns: region, amount, unit (seconds | hours | days | working_days), note.
    Regions not listed get clearing.model.DEFAULT_PRE_LOSS_LIFETIME."""
    text, source = _data_text(path, "pre_loss_policy.csv")
    lifetimes: dict[str, PreLossLifetime] = {}
    for line_no, row in enumerate(csv.DictReader(text.splitlines()), start=2):
        try:
            region, amount, unit = row["region"].strip(), int(row["amount"]), row["unit"].strip()
        except (KeyError, AttributeError, ValueError, TypeError) as exc:
            raise PolicyError(f"{source}:{line_no}: bad pre-loss row {row!r}") from exc
        if unit not in UNITS or not 0 < amount <= 1000 or region in lifetimes:
            raise PolicyError(f"{source}:{line_no}: bad or duplicate pre-loss row {row!r}")
        lifetimes[region] = PreLossLifetime(amount, unit)
    return lifetimes


def load_policy(settings: Settings) -> Policy:
    return Policy(
        institutions=load_institutions(settings.institutions_file),
        pre_loss_lifetimes=load_pre_loss_lifetimes(settings.pre_loss_policy_file),
        pin_verification_required=settings.terminal_security,
    )
