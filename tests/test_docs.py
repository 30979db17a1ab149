"""What the documents promise about themselves: the README is a short front door that starts with
the two commands, and every number of the claims table is the committed results file's."""

import json
from pathlib import Path

from warp_rlhf.stages.experiment import TABLE_BEGIN, TABLE_END, claims_table

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_starts_with_the_two_commands_and_is_at_most_150_lines():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 150
    commands = [line.split("#")[0].strip() for line in lines[:6] if line.startswith("make ")]
    assert commands == ["make demo", "make test"]


def test_the_claims_table_is_the_results_files():
    doc = (REPO / "docs" / "paper-claims.md").read_text()
    table = doc.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip()
    results = json.loads((REPO / "docs" / "paper-claims" / "results.json").read_text())
    assert table == claims_table(results).strip()
    for claim in results["claims"]:
        assert (REPO / "docs" / "paper-claims" / f"{claim['claim']}.png").exists()
