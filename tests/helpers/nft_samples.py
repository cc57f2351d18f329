"""Sample guest policies (tests/fixtures/nft/sample-policies.json) as validated
GuestPolicy values: used by the firewall unit tests and the fixture capture script."""

from __future__ import annotations

import json
from pathlib import Path

from reconciler.firewall import GuestPolicy, validate_policy

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nft"


def load_sample(*groups: str) -> list[GuestPolicy]:
    data = json.loads((FIXTURES / "sample-policies.json").read_text())
    return [
        validate_policy(
            item["mac"],
            item["default_action"],
            item["rules"],
            internal_if=item.get("internal_if"),
            external_if=item.get("external_if"),
        )
        for group in groups
        for item in data[group]
    ]
