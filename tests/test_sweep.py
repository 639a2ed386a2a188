"""`distill sweep`: variants, validation, resumability and the table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from distill.commands.cli import main
from distill.errors import ConfigError
from distill.training.sweep import load_sweep, run_sweep, variant_configs
from tests.conftest import shrink, write_yaml

SWEEPS = sorted((Path(__file__).parent.parent / "experiments" / "ablations").glob("*.yaml"))


def test_there_are_sweeps() -> None:
    assert "conaclip_edges.yaml" in {p.name for p in SWEEPS}


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_shipped_sweep_validates(path: Path, data_root: Path, tiny_towers: Path, tmp_path: Path) -> None:
    sweep = load_sweep(path)
    if any(v.base for v in sweep.variants):  # each experiment shrunk its own way, after the variant's overrides
        for v in sweep.variants:
            v.overrides = [*v.overrides, *shrink(Path(v.base or sweep.base), data_root, tmp_path, tiny_towers)]
        configs = variant_configs(sweep)
    else:
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
    assert [name for name, _ in configs] == ["full", "si_st,si_st.temperature=0.05", "si_st,si_st.temperature=0.1",
                                             "si_st+si_tt,si_st.temperature=0.05", "si_st+si_tt,si_st.temperature=0.1"]
    last = configs["si_st+si_tt,si_st.temperature=0.1", None]
    assert [n for n, e in last.edges.items() if e.enabled] == ["si_st", "si_tt"]
    assert last.edges["si_st"].args["temperature"] == 0.1
    assert last.output_dir == str(tmp_path / "sweep" / "si_st+si_tt,si_st.temperature=0.1") and last.resume == "last"
    seeded = variant_configs(load_sweep(path), seeds=[3, 4])
    assert len(seeded) == 10 and seeded["full", 4].seed == 4 and seeded["full", 4].data.seed == 4
    assert seeded["full", 3].output_dir == str(tmp_path / "sweep" / "full" / "seed3")


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
    assert main(["sweep", str(path), "--seeds", "0", "1"]) == 0
    for name in ("full", "task_only"):
        for seed in (0, 1):
            run = out / name / f"seed{seed}"
            assert (run / "final.ckpt").is_file() and (run / "eval_test.json").is_file()
            assert (run / "eval_test.ranks.npz").is_file()
    rows = [line for line in (out / "sweep.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 2  # header + 2 variants
    assert rows[1].startswith("| full | si_st, si_tt, st_ti_kl | 2 |") and rows[1].endswith("| ref |  |")
    assert rows[2].startswith("| task_only | si_st | 2 |") and " ± " in rows[2] and "[" in rows[2]
    table = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["variant"], r["seed"]) for r in table] == [("full", "0"), ("full", "1"), ("task_only", "0"), ("task_only", "1")]
    summary = json.loads((out / "sweep.json").read_text())
    diff = summary[1]["vs_reference"]["rsum"]
    assert diff["low"] <= diff["delta"] <= diff["high"]
    mean = sum(float(r["rsum"]) for r in table[2:]) / 2 - sum(float(r["rsum"]) for r in table[:2]) / 2
    assert diff["delta"] == pytest.approx(mean, abs=1e-9)  # the pooled point estimate is the mean difference
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    assert main(["compare", str(out / "task_only"), str(out / "full"), "--output", str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out
    assert "2 paired run(s) (seed0, seed1)" in printed and printed.count("[") >= 7
    compared = json.loads((tmp_path / "c.json").read_text())
    rsum = next(m for m in compared["metrics"] if m["metric"] == "rsum")
    assert rsum["delta"] == pytest.approx(diff["delta"]) and rsum["low"] == pytest.approx(diff["low"])

    assert main(["sweep", str(path), "--seeds", "0", "1"]) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 4
    assert not (out / "full" / "seed0" / "logs" / "version_1").exists()
    # another budget under the same folders would mix two experiments: refused, one line a run
    assert main(["sweep", str(path), "trainer.max_steps=3", "--seeds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("was run with another config (trainer.max_steps 2 -> 3" in line for line in err), err
    # a run saved before a setting existed (here: trainer.loggers) still counts as this sweep's
    saved = out / "full" / "seed0" / "config.yaml"
    saved.write_text("\n".join(line for line in saved.read_text().splitlines() if not line.startswith("  loggers")
                               and not line.startswith("  - csv")))
    assert "loggers" not in saved.read_text()
    assert main(["sweep", str(path), "--seeds", "0", "1"]) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 4


def test_sweep_scores_a_zeroshot_task_next_to_rsum(tiny_yaml: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    path = write_yaml(tmp_path, "sweep.yaml", f"""
        base: {tiny_yaml.name}
        output_dir: {out}
        overrides: [trainer.max_steps=1]
        zeroshot: embedded:colour
        variants:
          - {{name: full}}
          - {{name: task_only, edges: [si_st]}}
        """)
    assert main(["sweep", str(path)]) == 0
    result = json.loads((out / "full" / "zeroshot_embedded_colour.json").read_text())
    assert result["task"] == "embedded:colour" and 0 <= result["top1"] <= 100
    header = next(line for line in (out / "sweep.md").read_text().splitlines() if line.startswith("| variant"))
    assert "RSUM" in header and "zero-shot" in header.lower()
    assert "zeroshot_top1" in next(csv.DictReader(open(out / "sweep.csv")))
    bad = write_yaml(tmp_path, "bad.yaml", path.read_text().replace("embedded:colour", "embedded:size"))
    with pytest.raises(ConfigError, match="embedded:size"):
        run_sweep(bad)


def test_a_variant_trains_its_own_experiment(tiny_yaml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`base:` per variant: a methods table is a sweep over experiments; `--variants` picks some."""
    write_yaml(tmp_path, "other.yaml", f"""
        extends: {tiny_yaml.name}
        edges:
          st_ti_kl: null
          ti_st:
            loss: infonce
            inputs: [student.text, teacher.image]
        """)
    out = tmp_path / "methods"
    path = write_yaml(tmp_path, "methods.yaml", f"""
        base: {tiny_yaml.name}
        output_dir: {out}
        overrides: [trainer.max_steps=1]
        split: test
        variants:
          - {{name: alone, edges: [si_st]}}
          - {{name: other, base: other.yaml, overrides: [edges.si_tt.enabled=false]}}
          - {{name: other_ti, base: other.yaml, edges: [ti_st]}}
        """)
    configs = variant_configs(load_sweep(path))
    assert sorted(configs["other", None].edges) == ["si_st", "si_tt", "ti_st"]
    assert [n for n, e in configs["other", None].edges.items() if e.enabled] == ["si_st", "ti_st"]
    assert [n for n, e in configs["other_ti", None].edges.items() if e.enabled] == ["ti_st"]
    assert configs["other", None].output_dir == str(out / "other")

    bad = write_yaml(tmp_path, "bad.yaml", path.read_text().replace("edges: [ti_st]", "edges: [st_ti_kl]")
                     .replace("{name: other, base: other.yaml", "{name: other, base: nowhere.yaml"))
    with pytest.raises(ConfigError) as e:
        variant_configs(load_sweep(bad))
    assert len(e.value.problems) == 1 and e.value.problems[0].endswith(f"variants[1].base: no such experiment file {tmp_path / 'nowhere.yaml'}")
    bad.write_text(bad.read_text().replace("nowhere.yaml", "other.yaml"))
    with pytest.raises(ConfigError) as e:
        variant_configs(load_sweep(bad))
    assert e.value.problems[0] == "variants[2].edges[0]: unknown edge 'st_ti_kl'; edges: si_st, si_tt, ti_st"

    assert main(["sweep", str(path), "--variants", "alone", "nope"]) == 2
    assert "--variants: unknown variant 'nope'; the sweep has: alone, other, other_ti" in capsys.readouterr().err
    assert main(["sweep", str(path), "--variants", "other", "alone"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["alone", "other"]
    rows = [line for line in (out / "sweep.md").read_text().splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| alone | si_st | 1 |") and rows[1].endswith("| ref |  |")  # the file's order
    assert rows[2].startswith("| other | si_st, ti_st | 1 |")
    # the same config in another sweep: its finished run folder, linked in, is reused, not refit
    again = write_yaml(tmp_path, "again.yaml", path.read_text().replace(str(out), str(tmp_path / "again")))
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "other").symlink_to(out / "other")
    capsys.readouterr()
    assert main(["sweep", str(again), "--variants", "other"]) == 0
    assert "other: finished, skipped" in capsys.readouterr().out
