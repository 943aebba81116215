"""Scenario validation (every kind of error, with its line) and matrix expansion."""

from __future__ import annotations

import pytest

from harness.errors import ScenarioError
from harness.scenario import load, loads

GOOD = """
name: wal-durability
trials: 5
seed: 42
sqlite:
  journal_mode: [WAL, DELETE]
  synchronous: [NORMAL, FULL]
platform:
  kind: host
workload:
  kind: transfers
  rows_per_txn: 4
fault:
  kind: kill-writer
  after_commits: [20, 400]
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ScenarioError) as info:
        loads(text, "s.yaml")
    return [str(p) for p in info.value.problems]


def test_issue_example_expands_to_cross_product():
    sc = loads(GOOD, "s.yaml")
    assert sc.name == "wal-durability" and sc.trials == 5 and sc.seed == 42
    got = {(c.journal_mode, c.synchronous) for c in sc.cells}
    assert got == {("WAL", "NORMAL"), ("WAL", "FULL"), ("DELETE", "NORMAL"), ("DELETE", "FULL")}
    assert all(c["fault.after_commits"] == (20, 400) for c in sc.cells)
    assert all(c.fault_class == "process-crash" for c in sc.cells)


def test_overrides_from_the_command_line():
    sc = loads(GOOD, "s.yaml", trials=2, seed=7)
    assert (sc.trials, sc.seed) == (2, 7)


def test_unknown_key_has_line_and_suggestion():
    text = GOOD.replace("trials: 5", "trails: 5")
    assert problems(text) == [
        "s.yaml:3: trails: unknown key (did you mean 'trials'?); expected one of name, "
        "description, trials, seed, timeout_s, sqlite, platform, workload, fault, exclude"]


def test_nested_unknown_key():
    text = GOOD.replace("  rows_per_txn: 4", "  rows_per_tx: 4")
    (p,) = problems(text)
    assert p.startswith("s.yaml:12: workload.rows_per_tx: unknown key (did you mean "
                        "'rows_per_txn'?)")


def test_bad_enum_in_an_axis_names_the_element():
    text = GOOD.replace("[WAL, DELETE]", "[WAL, DELET]")
    (p,) = problems(text)
    assert p == ("s.yaml:6: sqlite.journal_mode[1]: expected one of DELETE, TRUNCATE, PERSIST, "
                 "WAL, MEMORY, OFF; got 'DELET' (did you mean 'DELETE'?)")


def test_fault_kind_typo():
    (p,) = problems(GOOD.replace("kind: kill-writer", "kind: kill-writr"))
    assert p.startswith("s.yaml:14: fault.kind: expected one of kill-writer")
    assert "did you mean 'kill-writer'?" in p


def test_every_error_of_a_file_is_reported_in_line_order():
    text = """
    name: bad
    trails: 5
    sqlite:
      journal_mode: [WAL, DELET]
      synchronus: FULL
    platform:
      kind: host
      storage: volume
    fault:
      kind: kill-writer
      after_commits: [400, 20]
    """
    import textwrap
    got = problems(textwrap.dedent(text))
    assert [p.split(":")[1] for p in got] == ["3", "5", "6", "9", "12"]
    assert "platform.storage: 'volume' does not apply to platform host" in got[3]
    assert "fault.after_commits: min 400 is greater than max 20" in got[4]


def test_wrong_types():
    text = GOOD.replace("trials: 5", "trials: five").replace("rows_per_txn: 4", "rows_per_txn: 0")
    got = problems(text)
    assert got[0] == "s.yaml:3: trials: expected an integer; got 'five'"
    assert got[1] == "s.yaml:12: workload.rows_per_txn: must be at least 1; got 0"


def test_missing_name_and_not_a_mapping():
    assert problems("trials: 1\n") == ["s.yaml:1: missing required key 'name'"]
    assert problems("- a\n- b\n") == ["s.yaml:1: expected a mapping at the top of the file"]


def test_yaml_syntax_error_has_a_line():
    (p,) = problems("name: x\nsqlite:\n  journal_mode: [WAL\n")
    assert p == "s.yaml:4: not valid YAML: expected ',' or ']', but got '<stream end>'"


def test_duplicate_key():
    (p,) = problems("name: x\nname: y\n")
    assert p == "s.yaml:2: name: duplicate key"


def test_yaml_booleans_are_names_for_enums():
    sc = loads("name: x\nsqlite:\n  journal_mode: [OFF, WAL]\n  synchronous: [off, NORMAL]\n")
    assert {c.journal_mode for c in sc.cells} == {"OFF", "WAL"}
    assert {c.synchronous for c in sc.cells} == {"OFF", "NORMAL"}


def test_after_commits_and_after_ms_are_exclusive():
    (p,) = problems(GOOD.replace("after_commits: [20, 400]",
                                 "after_commits: [20, 400]\n  after_ms: [10, 20]"))
    assert p == "s.yaml:16: fault.after_ms: give after_commits or after_ms, not both"


def test_a_list_of_ranges_is_an_axis():
    sc = loads(GOOD.replace("[20, 400]", "[[1, 5], [100, 200]]"))
    assert {c["fault.after_commits"] for c in sc.cells} == {(1, 5), (100, 200)}
    assert len(sc.cells) == 8


def test_a_bare_number_is_a_fixed_point():
    sc = loads(GOOD.replace("[20, 400]", "50"))
    assert {c["fault.after_commits"] for c in sc.cells} == {(50, 50)}


def test_bad_range():
    (p,) = problems(GOOD.replace("[20, 400]", "[20, 400, 5]"))
    assert p == "s.yaml:15: fault.after_commits: expected a number or a pair [min, max]; " \
                "got [20, 400, 5]"


def test_platform_variants_and_incompatible_faults_are_skipped():
    text = """
    name: m
    platform:
      - kind: host
      - kind: container
        arch: [native, emulated]
        storage: [bind, volume]
    fault:
      kind: [kill-writer, kill-container]
    """
    import textwrap
    sc = loads(textwrap.dedent(text))
    labels = [c.label for c in sc.cells]
    # host: kill-writer only; containers: 2 arch x 2 storage x 2 faults
    assert len(sc.cells) == 1 + 8
    assert "WAL+FULL host kill-writer transfers" in labels
    assert not any("host kill-container" in x for x in labels)
    assert any("needs platform container" in n for n in sc.notes)


def test_storage_axis_collapses_for_a_platform_it_does_not_apply_to():
    sc = loads("name: m\nplatform:\n  kind: [host, container]\n  storage: [bind, volume]\n")
    assert sorted(c.label for c in sc.cells) == [
        "WAL+FULL container/native/bind kill-writer transfers",
        "WAL+FULL container/native/volume kill-writer transfers",
        "WAL+FULL host kill-writer transfers"]


def test_all_cells_dropped_is_an_error():
    (p,) = problems("name: m\nplatform:\n  kind: host\nfault:\n  kind: kill-container\n")
    assert p.startswith("s.yaml:5: fault.kind: no cell is left to run: ")
    assert "fault kill-container needs platform container, not host" in p


def test_tmpfs_does_not_outlive_a_container_kill():
    sc = loads("name: m\nplatform:\n  kind: container\n  storage: [tmpfs, volume]\n"
               "fault:\n  kind: kill-container\n")
    assert [c["platform.storage"] for c in sc.cells] == ["volume"]
    assert any("tmpfs does not outlive" in n for n in sc.notes)


def test_exclude_dotted_and_nested():
    text = GOOD + "exclude:\n  - {sqlite.journal_mode: DELETE, sqlite.synchronous: NORMAL}\n" \
                  "  - sqlite: {journal_mode: WAL, synchronous: FULL}\n"
    sc = loads(text)
    assert {(c.journal_mode, c.synchronous) for c in sc.cells} == {
        ("WAL", "NORMAL"), ("DELETE", "FULL")}
    assert "2 combination(s) excluded by exclude:" in sc.notes


def test_exclude_unknown_key_and_value():
    got = problems(GOOD + "exclude:\n  - {sqlite.journal_mod: WAL}\n  - {fault.kind: nope}\n")
    assert got[0] == ("s.yaml:17: exclude[0].sqlite.journal_mod: unknown key (did you mean "
                      "'sqlite.journal_mode'?)")
    assert got[1].startswith("s.yaml:18: exclude[1].fault.kind: expected one of kill-writer")


def test_trial_seeds_are_stable_and_distinct():
    a = loads(GOOD)
    b = loads(GOOD)
    seeds = {a.trial_seed(c, n) for c in a.cells for n in range(5)}
    assert len(seeds) == 20
    assert a.trial_seed(a.cells[0], 3) == b.trial_seed(b.cells[0], 3)
    assert a.trial_seed(a.cells[0], 3) != loads(GOOD, seed=43).trial_seed(a.cells[0], 3)


def test_missing_file_and_unreadable(tmp_path):
    with pytest.raises(ScenarioError) as info:
        load(tmp_path / "nope.yaml")
    assert str(info.value).endswith("nope.yaml: no such file")


def test_shipped_scenarios_are_valid():
    from pathlib import Path
    for p in sorted((Path(__file__).parents[2] / "scenarios").glob("*.yaml")):
        assert load(p).cells, p
