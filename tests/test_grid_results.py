"""Results of an experiment grid (handclip_nb/evaluate/grid_results.py): results.csv rows,
the paper-style table pooled over seeds and splits (against a hand computation), best cells,
seed spread, gains over zero-shot, the published table, the figures, and notebooks/results.ipynb
through papermill on fake run folders (with its self-contained HTML copy)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import yaml

from handclip_nb import viz
from handclip_nb.constants import METRIC_NAMES
from handclip_nb.evaluate import grid_results

matplotlib.use("Agg")
REPO = Path(__file__).resolve().parents[1]


def _write_run(folder: Path, *, stage: str, rank1: list[float], seed: int = 0,
               dataset: str = "11k", aspect: str = "dorsal_r", backbone: str = "vitb16",
               synthetic: bool = True, finished: bool = True, verification: bool = True,
               params: dict | None = None, metrics: dict | None = None) -> dict:
    """A fake finished run folder: params.yaml and a metrics.json whose per-split rank-1 is
    ``rank1`` (the other metrics derived from it), as finish_run would write them; ``params``
    and ``metrics`` add to (or replace) what they hold."""
    folder.mkdir(parents=True, exist_ok=True)
    params = {"stage": stage, "dataset": dataset, "aspect": aspect, "backbone": backbone,
              "seed": seed, "num_splits": len(rank1),
              "data_root": None if synthetic else "/data/11k", **(params or {})}
    (folder / "params.yaml").write_text(yaml.safe_dump({"params": params}))
    if finished:
        test = {}
        for k, m in enumerate(METRIC_NAMES):
            values = [v + k for v in rank1]
            test[m] = {"mean": float(np.mean(values)),
                       "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                       "per_split": values}
        extra = metrics or {}
        metrics = {"stage": stage, "dataset": dataset,
                   "aspect": "dorsal" if dataset == "hd" else aspect, "backbone": backbone,
                   "num_splits": len(rank1), "test": test, "provenance": {"seed": seed}}
        if verification:
            metrics["verification"] = {"metrics": {
                "eer": {"mean": 10.0 + seed, "std": 1.0, "per_split": [10.0 + seed] * 2},
                "tar_at_far1e-2": {"mean": 50.0, "std": 0.0, "per_split": [50.0] * 2}}}
        (folder / "metrics.json").write_text(json.dumps({**metrics, **extra}))
    return {"name": folder.name, "stage": stage, "folder": str(folder),
            "axes": {"seed": seed, "aspect": "hd" if dataset == "hd" else aspect,
                     "backbone": backbone}}


def _grid(root: Path, synthetic: bool = True) -> list[dict]:
    """Two seeds × (zero-shot, stage 1, CLIP-ReID) × vitb16 on 11k dorsal_r, rn50 zero-shot and
    CLIP-ReID on dorsal_r, vitb16 on HD, and one unfinished run."""
    runs = root / "runs"
    specs = [
        _write_run(runs / "stage0-vitb16-s0", stage="stage0", rank1=[60.0, 70.0], seed=0,
                   synthetic=synthetic),
        _write_run(runs / "stage0-vitb16-s1", stage="stage0", rank1=[62.0, 64.0], seed=1,
                   synthetic=synthetic),
        _write_run(runs / "stage1-vitb16-s0", stage="stage1", rank1=[60.0, 70.0], seed=0,
                   synthetic=synthetic),
        _write_run(runs / "stage2-vitb16-s0", stage="stage2", rank1=[80.0, 90.0], seed=0,
                   synthetic=synthetic),
        _write_run(runs / "stage2-vitb16-s1", stage="stage2", rank1=[70.0, 100.0], seed=1,
                   synthetic=synthetic),
        _write_run(runs / "stage0-rn50-s0", stage="stage0", rank1=[50.0, 52.0], seed=0,
                   backbone="rn50", synthetic=synthetic),
        _write_run(runs / "stage2-rn50-s0", stage="stage2", rank1=[91.0, 95.0], seed=0,
                   backbone="rn50", synthetic=synthetic, verification=False),
        _write_run(runs / "stage2-vitb16-hd-s0", stage="stage2", rank1=[40.0, 44.0], seed=0,
                   dataset="hd", synthetic=synthetic),
        _write_run(runs / "stage3-vitb16-s0", stage="stage3", rank1=[75.0, 77.0], seed=0,
                   synthetic=synthetic, finished=False),
    ]
    specs[0]["axes"]["n_ctx"] = 4  # an axis only some runs set
    return specs


@pytest.fixture()
def grid(tmp_path):
    specs = _grid(tmp_path)
    return {"root": tmp_path, "specs": specs, "df": grid_results.results_rows(specs)}


def test_results_rows_one_row_per_run(grid):
    df = grid["df"].set_index("run")
    assert len(df) == len(grid["specs"])
    assert list(grid["df"].columns[:3]) == ["run", "stage", "method"]
    row = df.loc["stage2-vitb16-s1"]
    assert row["method"] == "CLIP-ReID" and row["protocol"] == "11k/dorsal_r"
    assert row["dataset"] == "11k" and row["aspect"] == "dorsal_r" and row["backbone"] == "vitb16"
    assert row["seed"] == 1 and row["num_splits"] == 2 and bool(row["synthetic"])
    assert row["rank1_mean"] == 85.0 and row["rank1_std"] == pytest.approx(math.sqrt(450))
    assert row["mAP_mbanet_mean"] == 85.0 + 4 and row["eer_mean"] == 11.0
    assert row["tar_at_far1e-2_mean"] == 50.0 and row["folder"] == grid["specs"][4]["folder"]
    assert math.isnan(df.loc["stage2-rn50-s0", "eer_mean"])  # no verification recorded
    hd = df.loc["stage2-vitb16-hd-s0"]
    assert hd["protocol"] == "hd" and hd["aspect"] == "dorsal" and hd["axis_aspect"] == "hd"
    assert pd.isna(df.loc["stage2-vitb16-s0", "axis_aspect"])  # the axis equals the recorded
    assert df.loc["stage0-vitb16-s0", "n_ctx"] == 4 and pd.isna(df.loc["stage2-vitb16-s0",
                                                                       "n_ctx"])
    unfinished = df.loc["stage3-vitb16-s0"]
    assert not unfinished["finished"] and math.isnan(unfinished["rank1_mean"])
    assert unfinished["method"] == "PromptSG" and unfinished["backbone"] == "vitb16"
    assert grid_results.results_rows([]).empty


def test_results_csv_round_trip(grid, tmp_path):
    path = grid_results.write_results_csv(grid["df"], tmp_path / "results.csv")
    assert not list(tmp_path.glob("*.tmp*"))
    back = grid_results.load_results(tmp_path)
    assert list(back.columns) == list(grid["df"].columns) and len(back) == len(grid["df"])
    np.testing.assert_allclose(back["rank1_mean"], grid["df"]["rank1_mean"])
    assert back["seed"].tolist() == grid["df"]["seed"].tolist()
    # a relative folder is taken from the grid folder
    relative = grid["df"].assign(folder=[str(Path(f).relative_to(tmp_path))
                                         for f in grid["df"]["folder"]])
    grid_results.write_results_csv(relative, path)
    assert grid_results.load_results(tmp_path)["folder"].tolist() == grid["df"]["folder"].tolist()
    with pytest.raises(FileNotFoundError, match="run the grid first"):
        grid_results.load_results(tmp_path / "nowhere")


def test_paper_table_pools_seeds_and_splits(grid):
    """Each cell: each run's mean over its splits, then mean ± sample std over the runs (seeds);
    a one-run cell shows ± over its splits and says so (†)."""
    table = grid_results.paper_table(grid["df"], "rank1")
    numbers, formatted = table  # unpacks as (numbers, formatted)
    assert list(numbers.columns) == ["11k/dorsal_r", "hd"]
    assert list(numbers.index) == [("zero-shot CLIP", "vitb16"), ("zero-shot CLIP", "rn50"),
                                   ("CLIP-ReID", "vitb16"), ("CLIP-ReID", "rn50")]
    # zero-shot vitb16 on dorsal_r: seed 0 splits [60, 70], seed 1 splits [62, 64]
    seed_means = [(60.0 + 70.0) / 2, (62.0 + 64.0) / 2]
    mean = sum(seed_means) / 2
    std = math.sqrt(sum((m - mean) ** 2 for m in seed_means) / 1)
    cell = ("zero-shot CLIP", "vitb16"), "11k/dorsal_r"
    assert numbers.loc[cell] == pytest.approx(mean)
    assert table.std.loc[cell] == pytest.approx(std)
    assert table.count.loc[cell] == 4 and table.seeds.loc[cell] == 2
    assert formatted.loc[cell] == f"64.00 ± {std:.2f} (2×2)"
    # not the std over all four (seed, split) values, nor the mean of the seeds' stds
    pooled = [60.0, 70.0, 62.0, 64.0]
    assert std != pytest.approx(np.std(pooled, ddof=1))
    assert std != pytest.approx((np.std([60, 70], ddof=1) + np.std([62, 64], ddof=1)) / 2)
    # CLIP-ReID vitb16: seed means 85 and 85
    assert formatted.loc[("CLIP-ReID", "vitb16"), "11k/dorsal_r"] == "85.00 ± 0.00 (2×2)"
    # rn50 CLIP-ReID: one run, ± over its two splits [91, 95]
    one = ("CLIP-ReID", "rn50"), "11k/dorsal_r"
    assert table.std.loc[one] == pytest.approx(np.std([91.0, 95.0], ddof=1))
    assert formatted.loc[one] == "93.00 ± 2.83 (1×2†)" and table.seeds.loc[one] == 1
    assert math.isnan(numbers.loc[("zero-shot CLIP", "vitb16"), "hd"])
    assert formatted.loc[("zero-shot CLIP", "vitb16"), "hd"] == "–"
    # stage 1 repeats zero-shot CLIP and is left out; the unfinished stage 3 too
    assert "CLIP-ReID prompts (stage 1)" not in numbers.index.get_level_values(0)
    assert "PromptSG" not in numbers.index.get_level_values(0)
    # the best of each column: rn50 CLIP-ReID (93) on dorsal_r, the only HD cell on hd
    assert table.best.sum().tolist() == [1, 1]
    assert table.best.loc[("CLIP-ReID", "rn50"), "11k/dorsal_r"]
    assert table.best.loc[("CLIP-ReID", "vitb16"), "hd"]
    assert "| CLIP-ReID | rn50 | **93.00 ± 2.83 (1×2†)** |" in table.markdown()
    assert grid_results.POOLING_NOTE in table.markdown()
    html = table.styled().to_html()
    assert "font-weight: bold" in html and "93.00 ± 2.83 (1×2†)" in html
    assert "over the runs" in html  # the caption says what a cell pools


def test_paper_table_metrics_and_ties(grid):
    mbanet = grid_results.paper_table(grid["df"], "mAP_mbanet")
    standard = grid_results.paper_table(grid["df"], "mAP")
    cell = ("CLIP-ReID", "vitb16"), "11k/dorsal_r"
    assert mbanet.numbers.loc[cell] == pytest.approx(89.0)
    assert standard.numbers.loc[cell] == pytest.approx(88.0)  # fake records: rank1 + 3
    assert mbanet.label == "mAP (MBA-Net)"
    with pytest.raises(ValueError, match="unknown metric 'map'"):
        grid_results.paper_table(grid["df"], "map")
    tied = grid["df"].copy()
    rn50 = tied["run"] == "stage2-rn50-s0"
    vit = tied.loc[tied["run"] == "stage2-vitb16-s1", "setting"].iloc[0]
    tied.loc[rn50, ["backbone", "seed", "setting"]] = ["vitb16", 2, vit]  # a third seed
    both = grid_results.paper_table(tied, "rank1", stages=("stage0", "stage2"))
    assert both.count.loc[("CLIP-ReID", "vitb16"), "11k/dorsal_r"] == 6
    assert both.formatted.loc[("CLIP-ReID", "vitb16"), "11k/dorsal_r"].endswith("(3×2)")


def test_best_marks_every_tied_cell(tmp_path):
    specs = [_write_run(tmp_path / "a", stage="stage2", rank1=[80.0, 90.0]),
             _write_run(tmp_path / "b", stage="stage3", rank1=[90.0, 80.0]),
             _write_run(tmp_path / "c", stage="stage0", rank1=[1.0, 2.0])]
    table = grid_results.paper_table(grid_results.results_rows(specs))
    assert table.best["11k/dorsal_r"].tolist() == [False, True, True]  # stage 0, 2, 3


def test_seed_spread_and_gain_over_zero_shot(grid):
    spread = grid_results.seed_spread(grid["df"], "rank1")
    cell = spread[(spread["method"] == "CLIP-ReID") & (spread["backbone"] == "vitb16")
                  & (spread["protocol"] == "11k/dorsal_r")]
    assert cell["seed"].tolist() == [0, 1] and cell["mean"].tolist() == [85.0, 85.0]
    assert cell["n"].tolist() == [2, 2]
    assert spread["protocol"].tolist()[-1] == "hd"  # protocol order
    gain = grid_results.gain_over_zero_shot(grid["df"], "rank1").set_index(
        ["method", "backbone", "protocol"])
    assert gain.loc[("CLIP-ReID", "vitb16", "11k/dorsal_r"), "gain"] == pytest.approx(85 - 64)
    assert gain.loc[("CLIP-ReID", "rn50", "11k/dorsal_r"), "gain"] == pytest.approx(93 - 51)
    assert gain.loc[("CLIP-ReID", "rn50", "11k/dorsal_r"), "zero_shot"] == pytest.approx(51)
    assert math.isnan(gain.loc[("CLIP-ReID", "vitb16", "hd"), "gain"])  # no zero-shot on HD
    assert "zero-shot CLIP" not in gain.index.get_level_values(0)


def test_published_table_is_cited_and_filtered():
    everything = grid_results.published_table()
    assert len(everything) > 0 and everything.index.name == grid_results.PUBLISHED_LABEL
    for column in ("paper", "venue_year", "table", "method", "backbone", "dataset", "aspect",
                   "trained_on", "metric", "metric_definition", "value", "source_kind",
                   "source_url", "note"):
        assert everything[column].notna().all(), column
    assert everything["source_url"].str.startswith("https://").all()
    assert set(everything["metric"]) <= {"rank1", "mAP", "mAP_mbanet"}
    assert everything["value"].between(0, 100).all()
    # every definition says which mAP it is: the trapezoid one only under mAP_mbanet
    trapezoid = everything["metric_definition"].str.contains("trapezoid")
    assert (trapezoid == (everything["metric"] == "mAP_mbanet")).all()
    # protocols in the grid's naming; a secondary source names its primary source
    assert everything["protocol"].isin(grid_results.PROTOCOL_ORDER).all()
    assert everything["trained_on"].isin(grid_results.PROTOCOL_ORDER).all()
    assert set(everything["source_kind"]) == {"primary", "secondary"}
    secondary = everything[everything["source_kind"] == "secondary"]
    assert secondary["note"].str.contains("primary source").all()
    dorsal = grid_results.published_table(["11k/dorsal_r"])
    assert set(dorsal["protocol"]) == {"11k/dorsal_r"}
    assert grid_results.published_table(["11k/palmar_l", "hd"])["protocol"].isin(
        ["11k/palmar_l", "hd"]).all()
    assert grid_results.published_table([]).empty
    # a cross-domain number sits under the protocol it was tested on, saying where it trained
    hd = grid_results.published_table(["hd"])
    cross = hd[hd["trained_on"] != hd["protocol"]]
    assert set(cross["trained_on"]) == {"11k/dorsal_r"} and len(cross) == 8
    assert cross["note"].str.startswith("cross-domain: trained on 11k dorsal right").all()


_MBANET_NOTEBOOK = ("notebooks/references/01_MBA-Net_ Multi-Branch_with_Attention_Network_for_"
                    "Hand-Based_Person_Recognition.ipynb, cell 14")
#: MBA-Net's table as read in babupallam/CLIP-FH@d0f5b4b4's reference notebook (cell 14, the
#: markdown cell 'Section III: Experimental Results'): method -> (line of the same-domain
#: table's row in the cell's source, rank-1 / mAP per column 11k dorsal_r, dorsal_l, palmar_r,
#: palmar_l, HD; line of the cross-domain table's row, rank-1 / mAP trained on 11k dorsal_r and
#: tested on HD). The dorsal_r pairs are also the thesis report's Table 6.1 (page 60).
_MBANET_TABLE = {
    "GPA-Net": (84, [(94.80, 95.72), (94.87, 95.93), (95.83, 96.31), (95.72, 96.20),
                     (94.64, 95.08)], 100, (83.02, 84.65)),
    "RGA-Net": (85, [(94.77, 95.67), (95.30, 95.98), (92.66, 93.58), (94.95, 95.67),
                     (95.06, 95.39)], 101, (77.80, 80.07)),
    "ABD-Net": (86, [(95.89, 96.76), (94.26, 95.34), (96.21, 96.91), (95.54, 96.01),
                     (94.93, 95.38)], 102, (71.22, 73.86)),
    "MBA-Net": (87, [(97.45, 97.98), (96.71, 97.41), (98.05, 98.42), (97.42, 97.84),
                     (95.12, 95.54)], 103, (84.41, 85.98)),
}


def test_mbanet_table_values_are_pinned_to_where_they_were_read():
    table = grid_results.published_table()
    rows = table[table["paper"].str.startswith("Multi-Branch with Attention Network")]
    assert len(rows) == 4 * (5 + 1) * 2  # 4 methods x (5 columns + cross-domain) x 2 metrics
    assert (rows["source_kind"] == "secondary").all()
    assert rows["source_url"].str.contains("babupallam/CLIP-FH/blob/d0f5b4b47bca11014155e958ace0bcd6"
                                           "74c7b4de/notebooks/references/01_MBA-Net").all()
    assert rows["note"].str.contains("Baisa et al., 'Multi-Branch with Attention Network for "
                                     "Hand-Based Person Recognition', ICPR 2022").all()
    seen = 0
    for method, (line, columns, cross_line, cross) in _MBANET_TABLE.items():
        cells = list(zip(grid_results.PROTOCOL_ORDER, columns, [line] * 5)) + [
            ("hd", cross, cross_line)]
        for k, (protocol, (rank1, mean_ap), where) in enumerate(cells):
            trained_on = "11k/dorsal_r" if k == 5 else protocol
            got = rows[(rows["method"] == method) & (rows["protocol"] == protocol)
                       & (rows["trained_on"] == trained_on)].set_index("metric")
            assert sorted(got.index) == ["mAP_mbanet", "rank1"], (method, protocol)
            assert got.loc["rank1", "value"] == pytest.approx(rank1)
            assert got.loc["mAP_mbanet", "value"] == pytest.approx(mean_ap)
            for metric in ("rank1", "mAP_mbanet"):
                source = got.loc[metric, "table"]
                assert source.startswith(_MBANET_NOTEBOOK), source
                assert source.count(f"cell source line {where}") == 1, source
                assert ("Cross-Domain" in source) == (k == 5), source
                assert ("Table 6.1" in source) == (protocol == "11k/dorsal_r" and k < 5)
            seen += 2
    assert seen == len(rows)


def test_published_results_only_for_real_data(grid, tmp_path):
    assert not grid_results.ran_on_real_data(grid["df"])
    real = grid_results.results_rows(_grid(tmp_path / "real", synthetic=False))
    assert grid_results.ran_on_real_data(real)
    assert grid_results.real_protocols(real) == ["11k/dorsal_r", "hd"]
    mixed = pd.concat([real, grid["df"].iloc[:1]])
    assert not grid_results.ran_on_real_data(mixed)
    grid_results.write_results_csv(real, tmp_path / "real" / "results.csv")
    assert grid_results.ran_on_real_data(grid_results.load_results(tmp_path / "real"))


def test_grid_figures(grid):
    table = grid_results.paper_table(grid["df"], "rank1")
    fig = viz.plot_paper_table(table.numbers, table.std, best=table.best)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "93.0\n± 2.8" in texts and "–" in texts
    bold = [t for t in fig.axes[0].texts if t.get_fontweight() == "bold"]
    assert len(bold) == 2
    fig = viz.plot_seed_spread(grid_results.seed_spread(grid["df"]))
    assert [a.get_title() for a in fig.axes] == ["11k/dorsal_r", "hd"]
    fig = viz.plot_gain_over_zero_shot(grid_results.gain_over_zero_shot(grid["df"]))
    assert len(fig.axes[0].patches) == 2 * 2  # 2 cells (CLIP-ReID vitb16, rn50) × 2 protocols
    import matplotlib.pyplot as plt

    plt.close("all")


def _run_results_notebook(root: Path, out: Path) -> dict:
    import papermill as pm

    pm.execute_notebook(str(REPO / "notebooks" / "results.ipynb"), str(out),
                        parameters={"grid_dir": str(root)}, kernel_name="python3",
                        cwd=str(REPO), progress_bar=False)
    return json.loads(out.read_text())


def _outputs(nb: dict) -> tuple[str, int]:
    text, images = [], 0
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            text.append(o.get("text", "") if isinstance(o.get("text"), str)
                        else "".join(o.get("text", [])))
            data = o.get("data", {})
            text.append("".join(data.get("text/html", "")) + "".join(data.get("text/plain", "")))
            images += "image/png" in data
    return "\n".join(text), images


@pytest.mark.notebook
def test_results_notebook_on_a_synthetic_grid(grid, tmp_path):
    grid_results.write_results_csv(grid["df"], grid["root"] / "results.csv")
    executed = tmp_path / "executed.ipynb"
    nb = _run_results_notebook(grid["root"], executed)
    text, images = _outputs(nb)
    assert images == 4  # two paper tables, the seed spread, the gain
    assert "93.00 ± 2.83" in text and "font-weight: bold" in text
    assert grid_results.SYNTHETIC_NOTE in text and grid_results.PUBLISHED_LABEL not in text
    assert "MBA-Net" not in text.replace("mAP (MBA-Net)", "")  # no published number
    # the self-contained HTML copy the grid runner writes beside it
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(executed), as_version=4))
    images = re.findall(r'<img[^>]* src="([^"]{0,40})', body)
    assert len(images) == 4 and all(i.startswith("data:image/png;base64,") for i in images)


@pytest.mark.notebook
def test_results_notebook_on_real_data_shows_published_results(tmp_path):
    root = tmp_path / "grid"
    df = grid_results.results_rows(_grid(root, synthetic=False))
    grid_results.write_results_csv(df, root / "results.csv")
    text, _ = _outputs(_run_results_notebook(root, tmp_path / "executed.ipynb"))
    assert grid_results.PUBLISHED_LABEL in text and grid_results.SYNTHETIC_NOTE not in text
    assert "CLIP-FH" in text
    # MBA-Net's table beside the grid's columns (11k dorsal_r, HD), the cross-domain rows
    # under HD, each with its full source location and definition (no truncated cell)
    for value in ("97.45", "97.98", "95.12", "95.54", "84.41", "85.98"):
        assert value in text, value
    assert "97.41" not in text  # MBA-Net's dorsal_l mAP: not a column of this grid
    assert "cell source line 103" in text and "Table 6.1" in text
    assert "MBA-Net&#x27;s trapezoid mAP" in text or "MBA-Net's trapezoid mAP" in text
    assert "secondary" in text


# ------------------------------------------------------------ a cell pools only seeds


def _ablation(root: Path) -> list[dict]:
    """A loss-weight ablation: stage-2 runs with triplet_weight 0 and 1, two seeds each, from
    one zero-shot run (a pretrained backbone: seed-free) — the grid of the issue that rendered
    one cell of 76.15 from runs at 73.88 and 78.43."""
    specs = [_write_run(root / "stage0", stage="stage0", rank1=[60.0, 62.0], seed=0,
                        params={"lr": 3e-4, "image_size": [224, 288]})]
    values = {(0.0, 0): [73.0, 74.0], (0.0, 1): [74.0, 74.52], (1.0, 0): [78.0, 79.0],
              (1.0, 1): [78.0, 78.72]}
    stage1 = {seed: _write_run(root / f"stage1-seed{seed}", stage="stage1", rank1=[1.0, 2.0],
                               seed=seed, params={"lr": 1e-2}) for seed in (0, 1)}
    for (weight, seed), rank1 in values.items():
        specs.append(_write_run(root / f"stage2-tw{weight}-seed{seed}", stage="stage2",
                                rank1=rank1, seed=seed,
                                params={"triplet_weight": weight, "lr": 3e-4,
                                        "image_size": [224, 288],
                                        # each seed's stage 2 reads its own seed's stage 1
                                        "stage1_dir": stage1[seed]["folder"]}))
    return specs


def test_an_axis_other_than_the_seed_is_a_row_never_pooled(tmp_path):
    df = grid_results.results_rows(_ablation(tmp_path))
    table = grid_results.paper_table(df, "rank1")
    rows = list(table.numbers.index)
    assert rows == [("zero-shot CLIP", "vitb16"),
                    ("CLIP-ReID · triplet_weight=0.0", "vitb16"),
                    ("CLIP-ReID · triplet_weight=1.0", "vitb16")]
    assert table.numbers.loc[rows[1], "11k/dorsal_r"] == pytest.approx((73.5 + 74.26) / 2)
    assert table.numbers.loc[rows[2], "11k/dorsal_r"] == pytest.approx((78.5 + 78.36) / 2)
    assert table.formatted.loc[rows[1], "11k/dorsal_r"].endswith("(2×2)")
    spread = grid_results.seed_spread(df, "rank1")
    assert sorted(spread["method"].unique()) == [r[0] for r in sorted(rows)]
    assert len(spread) == 5  # the zero-shot run and 2 seeds x 2 weights
    gain = grid_results.gain_over_zero_shot(df, "rank1").set_index("method")
    assert gain.loc["CLIP-ReID · triplet_weight=1.0", "gain"] == pytest.approx(78.43 - 61.0)
    assert gain.loc["CLIP-ReID · triplet_weight=0.0", "gain"] == pytest.approx(73.88 - 61.0)


def test_a_difference_inherited_from_the_upstream_run_is_a_row(tmp_path):
    """Two stage-2 runs with the same settings, fed by stage-1 runs with different n_ctx."""
    specs = []
    for n_ctx, rank1 in ((4, [70.0, 72.0]), (8, [80.0, 82.0])):
        up = _write_run(tmp_path / f"stage1-n{n_ctx}", stage="stage1", rank1=[1.0, 2.0],
                        params={"n_ctx": n_ctx})
        specs.append(_write_run(tmp_path / f"stage2-n{n_ctx}", stage="stage2", rank1=rank1,
                                params={"stage1_dir": up["folder"]}))
    table = grid_results.paper_table(grid_results.results_rows(specs), "rank1")
    assert [m for m, _ in table.numbers.index] == ["CLIP-ReID · stage1.n_ctx=4",
                                                   "CLIP-ReID · stage1.n_ctx=8"]


def test_runs_tested_on_other_splits_are_never_pooled(tmp_path):
    specs = [_write_run(tmp_path / f"s{seed}", stage="stage2", rank1=[70.0 + seed, 71.0],
                        seed=seed, metrics={"test_splits_hash": "abcdef12" * 8 if seed else
                                            "01234567" * 8}) for seed in (0, 1)]
    table = grid_results.paper_table(grid_results.results_rows(specs), "rank1")
    assert [m for m, _ in table.numbers.index] == ["CLIP-ReID · test splits 01234567",
                                                   "CLIP-ReID · test splits abcdef12"]
    assert (table.seeds == 1).all().all()


def test_a_gain_compares_with_the_zero_shot_run_of_the_same_evaluation_settings(tmp_path):
    """Zero-shot at two input sizes, CLIP-ReID at each: each gain uses its own size."""
    specs = []
    for size, zero, trained in (([224, 224], [50.0, 50.0], [70.0, 70.0]),
                                ([224, 288], [60.0, 60.0], [90.0, 90.0])):
        tag = "x".join(map(str, size))
        specs.append(_write_run(tmp_path / f"z{tag}", stage="stage0", rank1=zero,
                                params={"image_size": size}))
        specs.append(_write_run(tmp_path / f"t{tag}", stage="stage2", rank1=trained,
                                params={"image_size": size}))
    gain = grid_results.gain_over_zero_shot(grid_results.results_rows(specs), "rank1")
    gain = gain.set_index("method")["gain"]
    assert gain["CLIP-ReID · image_size=[224, 224]"] == pytest.approx(20.0)
    assert gain["CLIP-ReID · image_size=[224, 288]"] == pytest.approx(30.0)


def test_results_csv_records_commit_job_and_setting(tmp_path):
    spec = _write_run(tmp_path / "r", stage="stage2", rank1=[1.0, 2.0],
                      metrics={"provenance": {"seed": 0, "git_commit": "abc123"},
                               "test_splits_hash": "f" * 64})
    row = grid_results.results_rows([{**spec, "job_id": "4242"}]).iloc[0]
    assert row["git_commit"] == "abc123" and row["slurm_job_id"] == "4242"
    assert row["test_splits_hash"] == "f" * 64
    assert json.loads(row["setting"])["backbone"] == "vitb16"
    assert "output_dir" not in json.loads(row["setting"])


def test_a_generated_dataset_in_a_folder_counts_as_synthetic(tmp_path):
    """data_root is set, but the run's metrics.json says the generator made its data."""
    specs = [_write_run(tmp_path / "r", stage="stage2", rank1=[1.0, 2.0], synthetic=False,
                        metrics={"synthetic": True})]
    df = grid_results.results_rows(specs)
    assert bool(df["synthetic"].iloc[0]) and not grid_results.ran_on_real_data(df)
    real = [_write_run(tmp_path / "q", stage="stage2", rank1=[1.0, 2.0], synthetic=False,
                       metrics={"synthetic": False})]
    assert grid_results.ran_on_real_data(grid_results.results_rows(real))
