"""`distill sweep`: variants, validation, resumability and the table."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from distill.commands.cli import main
from distill.errors import ConfigError
from distill.training.sweep import load_sweep, variant_configs
from tests.conftest import shrink, write_yaml

SWEEPS = sorted((Path(__file__).parent.parent / "experiments" / "ablations").glob("*.yaml"))


def test_there_are_sweeps() -> None:
    assert "conaclip_edges.yaml" in {p.name for p in SWEEPS}


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_shipped_sweep_validates(path: Path, data_root: Path, tiny_towers: Path, tmp_path: Path) -> None:
    sweep = load_sweep(path)
    configs = variant_configs(sweep, shrink(Path(sweep.base), data_root, tmp_path, tiny_towers))
    assert len(configs) >= 2
    names = list(configs)
    assert all(any(e.enabled for e in c.edges.values()) for c in configs.values()), names


def test_grid_and_explicit_variants(tiny_yaml: Path, tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "grid.yaml", f"""
        base: {tiny_yaml.name}
        output_dir: {tmp_path / 'sweep'}
        variants:
          - {{name: full}}
        grid:
          edges: [[si_st], [si_st, si_tt]]
          edges.si_st.args.temperature: [0.05, 0.1]
        """)
    configs = variant_configs(load_sweep(path))
    assert list(configs) == ["full", "si_st,si_st.temperature=0.05", "si_st,si_st.temperature=0.1",
                             "si_st+si_tt,si_st.temperature=0.05", "si_st+si_tt,si_st.temperature=0.1"]
    last = configs["si_st+si_tt,si_st.temperature=0.1"]
    assert [n for n, e in last.edges.items() if e.enabled] == ["si_st", "si_tt"]
    assert last.edges["si_st"].args["temperature"] == 0.1
    assert last.output_dir == str(tmp_path / "sweep" / "si_st+si_tt,si_st.temperature=0.1") and last.resume == "last"


def test_bad_variants_are_one_line_errors(tiny_yaml: Path, tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "bad.yaml", f"""
        base: {tiny_yaml.name}
        output_dir: {tmp_path / 'sweep'}
        variants:
          - {{name: a, edges: [si_st, nope]}}
          - {{name: b, overrides: [edges.si_st.args.temprature=0.1]}}
          - {{name: a}}
        """)
    with pytest.raises(ConfigError) as e:
        variant_configs(load_sweep(path))
    got = e.value.problems
    assert got[0].startswith("variants[0].edges[1]: unknown edge 'nope'")
    assert any(p.startswith("variants[1] (b): edges.si_st.args.temprature:") for p in got)
    assert any(p.startswith("variants[2].name: duplicate variant name 'a'") for p in got)
    typo = write_yaml(tmp_path, "typo.yaml", f"base: {tiny_yaml.name}\noutput_dir: x\nvariants: [{{name: a, edgs: [si_st]}}]\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: variants\[0\]\.edgs: unknown key"):
        load_sweep(typo)
    missing = write_yaml(tmp_path, "missing.yaml", "output_dir: x\nvariants: [{name: a}]\n")
    with pytest.raises(ConfigError, match=r"missing.yaml: base: missing value$"):
        load_sweep(missing)


def test_sweep_end_to_end_and_resumable(tiny_yaml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    path = write_yaml(tmp_path, "sweep.yaml", f"""
        base: {tiny_yaml.name}
        output_dir: {out}
        overrides: [trainer.max_steps=2, trainer.checkpoint_every_n_steps=1]
        split: test
        variants:
          - {{name: full}}
          - {{name: task_only, edges: [si_st]}}
        """)
    assert main(["sweep", str(path)]) == 0
    for name in ("full", "task_only"):
        assert (out / name / "final.ckpt").is_file() and (out / name / "eval_test.json").is_file()
    rows = [line for line in (out / "sweep.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 2  # header + 2 variants
    assert rows[1].startswith("| full | si_st, si_tt, st_ti_kl |") and rows[1].endswith("| ref |")
    assert rows[2].startswith("| task_only | si_st |")
    table = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["variant"] for r in table] == ["full", "task_only"] and float(table[0]["delta_rsum"]) == 0.0
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    assert main(["sweep", str(path)]) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 2
    assert not (out / "full" / "logs" / "version_1").exists()
