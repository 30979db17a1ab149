"""What the documents promise about themselves: the README is a short front door that starts with
the two commands, and every number of the claims table the claims page links is the committed
results file's."""

import json
from pathlib import Path

from warp_rlhf.stages.experiment import EXTRAPOLATED, claims_table

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_starts_with_the_two_commands_and_is_at_most_150_lines():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 150
    commands = [line.split("#")[0].strip() for line in lines[:6] if line.startswith("make ")]
    assert commands == ["make demo", "make test"]


def test_the_claims_table_is_the_results_files():
    claims = REPO / "docs" / "paper-claims"
    assert "](paper-claims/claims.md)" in (REPO / "docs" / "paper-claims.md").read_text()
    results = json.loads((claims / "results.json").read_text())
    assert (claims / "claims.md").read_text() == claims_table(results)
    for claim in results["claims"]:  # the extrapolated fronts are drawn in claim 3's figure
        figure = "warp_vs_reinforce" if claim["claim"] == EXTRAPOLATED else claim["claim"]
        assert (claims / f"{figure}.png").exists()
    assert (claims / "warp_vs_reinforce_difference.png").exists() and (claims / "seed_level.png").exists()
