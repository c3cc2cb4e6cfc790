"""Tables and figure of the planted-fault suite (`benchmarks/detection.py`), from its cached per-run results.

Every method turns the final checkpoint of a run into a ranking of its layers
(rank 1 = most suspect) and, where it has a flag rule, a set of flagged layers:

| method | ranks by | flags |
|---|---|---|
| peel replace | ``ds.peel.summary()`` of the default peel | ``ds.peel.flagged()`` |
| peel headroom | the same for ``view="headroom"`` | ``ds.peel.flagged()`` |
| WeightWatcher alpha | its alpha, averaged per block, largest first | alpha > 6 (WeightWatcher's "under-trained") |
| grad norm | ``summary(by="grad_norm")`` | none (no standard threshold) |
| ablation | ``summary(by="ablation")``: smallest loss increase first | increase below 0.01 nats (the flag floor) |
| weight change | ``summary(by="weight_change")`` | none (no standard threshold) |

Variants reported beside them (not in the headline table): the opposite
direction of grad norm and weight change, weight change two-sided (distance
of log weight change from the median layer's), and the headroom gap (on the
layer's own scale, as the summary ranks it) minus its value at the previous
checkpoint, or minus the median layer's (ranks as the gap does without
putting flagged layers first; flags where it exceeds the 0.01 floor).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

import peelnb
from peelnb.results import FLAG_FLOOR, RANKINGS

HEADLINE = ["peel replace", "peel headroom", "WeightWatcher alpha", "grad norm", "ablation", "weight change"]
WW_UNDERTRAINED = 6.0


def _ranks(score: np.ndarray) -> np.ndarray:
    """Ranks (1 = largest score) of ``score``; NaN scores rank last, ties keep layer order."""
    order = np.argsort(np.where(np.isnan(score), -np.inf, -score), kind="stable")
    ranks = np.empty(len(score), dtype=np.int64)
    ranks[order] = np.arange(1, len(score) + 1)
    return ranks


def _from_summary(table: pd.DataFrame, layers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    table = table.set_index("layer").loc[layers]
    return table["rank"].to_numpy(dtype=float), table["flagged"].to_numpy(dtype=bool)


def layer_rows(case: Any, folder: Path) -> list[dict]:
    """One row per (method, layer) for a case: rank, score and flag."""
    replace = peelnb.open(folder / "replace.nc")
    headroom = peelnb.open(folder / "headroom.nc")
    steps = replace["step"].values
    final = int(steps[-1])
    layers = replace["layer"].values
    bits = float(case.bits)
    no_flags = np.full(len(layers), np.nan)
    methods: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for name, ds in (("peel replace", replace), ("peel headroom", headroom)):
        table = ds.peel.summary(step=final, bits=bits)
        rank, flags = _from_summary(table, layers)
        methods[name] = (-rank, rank, flags.astype(float))
    ww = np.asarray(json.loads((folder / "weightwatcher.json").read_text())["alpha"])
    methods["WeightWatcher alpha"] = (ww, _ranks(ww), (ww > WW_UNDERTRAINED).astype(float))
    for name, by in (("grad norm", "grad_norm"), ("ablation", "ablation"), ("weight change", "weight_change")):
        table = replace.peel.summary(step=final, bits=bits, by=by).set_index("layer").loc[layers]
        value = table[by].to_numpy(dtype=float)
        flags = (value < FLAG_FLOOR).astype(float) if by == "ablation" else no_flags
        methods[name] = (value if RANKINGS[by][0] == "larger" else -value, table["rank"].to_numpy(float), flags)
    # variants
    for name, by in (("grad norm", "grad_norm"), ("weight change", "weight_change")):
        value = replace[by].sel(step=final).values
        larger = RANKINGS[by][0] == "larger"
        opposite = -value if larger else value  # the direction the documented one is not
        methods[f"{name} ({'smaller' if larger else 'larger'} first)"] = (opposite, _ranks(opposite), no_flags)
    change = replace["weight_change"].sel(step=final).values
    with np.errstate(divide="ignore"):  # a frozen layer's change is 0: infinitely far from the median
        two_sided = np.abs(np.log(change / np.median(change)))
    methods["weight change (two-sided)"] = (two_sided, _ranks(two_sided), no_flags)
    # the headroom gap on each layer's own scale (the summary's score), at every peeled step
    scores = np.array([headroom.peel.summary(step=int(s), bits=bits).set_index("layer").loc[layers, "score"].values
                       for s in headroom["step"].values])
    if len(scores) > 1:
        jump = scores[-1] - scores[-2]
        methods["headroom jump over own history"] = (jump, _ranks(jump), (jump > FLAG_FLOOR).astype(float))
    relative = scores[-1] - np.median(scores[-1])
    methods["headroom minus median layer"] = (relative, _ranks(relative), (relative > FLAG_FLOOR).astype(float))
    rows = []
    for method, (score, rank, flags) in methods.items():
        for i, layer in enumerate(layers):
            rows.append(dict(case=case.name, bits=bits, kind=case.kind or "clean", planted=case.layer, seed=case.seed,
                             method=method, layer=int(layer), score=float(score[i]), rank=float(rank[i]),
                             flagged=float(flags[i])))
    return rows


def case_table(layer_frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (case, method): the planted layer's rank, whether it is flagged, and the layers flagged."""
    rows = []
    for (case, method), group in layer_frame.groupby(["case", "method"], sort=False):
        first = group.iloc[0]
        planted = first["planted"]
        at = group[group["layer"] == planted] if pd.notna(planted) else None
        has_flags = group["flagged"].notna().all()
        rows.append(dict(
            case=case, bits=first["bits"], kind=first["kind"], planted=planted, seed=first["seed"], method=method,
            rank=float(at["rank"].iloc[0]) if at is not None else np.nan,
            planted_flagged=float(at["flagged"].iloc[0]) if at is not None else np.nan,
            n_flagged=float(group["flagged"].sum()) if has_flags else np.nan,
            others_flagged=float(group[group["layer"] != planted]["flagged"].sum()) if has_flags else np.nan,
        ))
    return pd.DataFrame(rows)


def summary_table(cases: pd.DataFrame) -> pd.DataFrame:
    """Per (precision, fault kind, method): top-1 rate and mean rank of the planted layer; flags."""
    faulty = cases[cases["kind"] != "clean"]
    out = faulty.groupby(["bits", "kind", "method"], sort=False).agg(
        top1=("rank", lambda r: float((r == 1).mean())), mean_rank=("rank", "mean"), n=("rank", "size"),
        planted_flagged=("planted_flagged", "mean"), others_flagged=("others_flagged", "mean"),
    ).reset_index()
    clean = cases[cases["kind"] == "clean"].groupby(["bits", "method"], sort=False).agg(
        n=("case", "size"), clean_flagged=("n_flagged", "mean")).reset_index()
    clean["kind"] = "clean"
    return pd.concat([out, clean], ignore_index=True)


def _fmt(value: float, spec: str = ".2f") -> str:
    return "-" if pd.isna(value) else format(value, spec)


def markdown(summary: pd.DataFrame, methods: list[str], n_layer: int) -> str:
    """The headline table: rows method, columns fault kinds, cells 'top-1 / mean rank'; flags on clean runs."""
    lines = []
    for bits, label in ((32.0, "full precision"), (1.58, "ternary (1.58-bit QAT)")):
        part = summary[np.isclose(summary["bits"], bits)]
        if part.empty:
            continue
        kinds = [k for k in dict.fromkeys(part["kind"]) if k != "clean"]
        n = int(part[part["kind"] == kinds[0]]["n"].iloc[0]) if kinds else 0
        lines.append(f"\n**{label}** ({n} runs per fault kind, {n_layer} layers: chance is top-1 "
                     f"{1 / n_layer:.2f}, mean rank {(n_layer + 1) / 2:.1f}). Cells: top-1 rate / mean rank of the "
                     "planted layer; last columns: layers flagged on clean runs, and on faulty runs the planted "
                     "layer's flag rate / other layers flagged per run.\n")
        lines.append("| method | " + " | ".join(kinds) + " | clean: flagged | faulty: planted flagged / others |")
        lines.append("|---|" + "---|" * (len(kinds) + 2))
        for method in methods:
            cells = []
            for kind in kinds:
                row = part[(part["kind"] == kind) & (part["method"] == method)]
                cells.append(f"{row['top1'].iloc[0]:.2f} / {row['mean_rank'].iloc[0]:.2f}" if len(row) else "-")
            clean = part[(part["kind"] == "clean") & (part["method"] == method)]
            faulty = part[(part["kind"] != "clean") & (part["method"] == method)]
            flags = _fmt(clean["clean_flagged"].iloc[0]) if len(clean) else "-"
            hit = f"{_fmt(faulty['planted_flagged'].mean())} / {_fmt(faulty['others_flagged'].mean())}"
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {flags} | {hit} |")
    return "\n".join(lines)


def repair_table(suite: Any, cases: list[Any], folder: Path) -> pd.DataFrame:
    rows = []
    for case in cases:
        path = folder / case.name / "repair.json"
        if case.kind != "noise" or not path.exists():
            continue
        r = json.loads(path.read_text())
        damage = r["loss_model"] - r["loss_clean_twin"]
        rows.append(dict(case=case.name, bits=case.bits, planted=case.layer, damage=damage,
                         recovered_planted=r["loss_model"] - r["repaired_planted"],
                         recovered_flagged=r["loss_model"] - r["repaired_flagged"],
                         recovered_all=r["loss_model"] - r["repaired_all"],
                         recovered_planted_k200=r["loss_model"] - r["repaired_planted_k200"],
                         **{**r, "flagged": " ".join(map(str, r["flagged"])) or "none"}))
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["share_planted"] = frame["recovered_planted"] / frame["damage"]
        frame["share_planted_k200"] = frame["recovered_planted_k200"] / frame["damage"]
    return frame


def figure(summary: pd.DataFrame, methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(b, label) for b, label in ((32.0, "full precision"), (1.58, "ternary (1.58-bit QAT)"))
              if np.isclose(summary["bits"], b).any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 0.45 * len(methods) + 1.6),
                             layout="constrained", squeeze=False)
    for ax, (bits, label) in zip(axes[0], panels):
        part = summary[np.isclose(summary["bits"], bits) & (summary["kind"] != "clean")]
        kinds = list(dict.fromkeys(part["kind"]))
        top1 = np.array([[part[(part["kind"] == k) & (part["method"] == m)]["top1"].mean() for k in kinds]
                         for m in methods])
        rank = np.array([[part[(part["kind"] == k) & (part["method"] == m)]["mean_rank"].mean() for k in kinds]
                         for m in methods])
        image = ax.imshow(top1, vmin=0, vmax=1, cmap="Greens", aspect="auto")
        for i in range(len(methods)):
            for j in range(len(kinds)):
                ax.text(j, i, f"{top1[i, j]:.2f}\n({rank[i, j]:.1f})", ha="center", va="center", fontsize="small",
                        color="white" if top1[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set_yticks(range(len(methods)), methods)
        ax.set_title(f"{label}: top-1 rate (mean rank)", fontsize="medium")
    fig.colorbar(image, ax=axes[0].tolist(), label="top-1 rate of the planted layer", shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def to_dataset(layer_frame: pd.DataFrame) -> xr.Dataset:
    """The per-layer results as a Dataset: dims case x method x layer; case coordinates bits, kind, planted, seed."""
    ds = layer_frame.set_index(["case", "method", "layer"])[["score", "rank", "flagged"]].to_xarray()
    meta = layer_frame.drop_duplicates("case").set_index("case").loc[ds["case"].values]
    ds = ds.assign_coords(bits=("case", meta["bits"].to_numpy(float)), kind=("case", meta["kind"].to_numpy(str)),
                          planted=("case", meta["planted"].to_numpy(float)), seed=("case", meta["seed"].to_numpy(int)))
    ds["score"].attrs.update(long_name="suspicion score (higher = ranked more under-optimized)")
    ds["rank"].attrs.update(long_name="rank of the layer (1 = most suspect)")
    ds["flagged"].attrs.update(long_name="flagged by the method's rule (NaN: the method has none)")
    return ds


def report(suite: Any, cases: list[Any], folder: Path, out: Path, *, command: str,
           sweep_names: list[str] = ()) -> pd.DataFrame:
    """Assemble, print and save the suite's tables and figure; returns the summary table."""
    layer_frame = pd.DataFrame([row for case in cases for row in layer_rows(case, folder / case.name)])
    per_case = case_table(layer_frame)
    summary = summary_table(per_case)
    repairs = repair_table(suite, cases, folder)
    out.mkdir(parents=True, exist_ok=True)
    ds = to_dataset(layer_frame)
    ds.attrs.update(command=command, suite=json.dumps({k: str(v) for k, v in vars(suite).items()}))
    ds.to_netcdf(out / "layers.nc", engine="h5netcdf")
    per_case.to_csv(out / "cases.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    if not repairs.empty:
        repairs.to_csv(out / "repair.csv", index=False)
    headline = markdown(summary, HEADLINE, suite.n_layer)
    variants = markdown(summary, [m for m in dict.fromkeys(summary["method"]) if m not in HEADLINE], suite.n_layer)
    (out / "table.md").write_text(f"Command: `{command}`\n{headline}\n\nVariants:\n{variants}\n", encoding="utf-8")
    figure(summary, HEADLINE, out / "detection.png")
    print(headline)
    print("\nvariants:" + variants)
    if not repairs.empty:
        print("\nrepair of the noise cases (nats/token):")
        print(repairs[["case", "damage", "recovered_planted", "share_planted", "recovered_planted_k200",
                       "share_planted_k200", "flagged", "recovered_flagged", "recovered_all"]].to_string(
            index=False, float_format=lambda v: f"{v:.4f}"))
    thresholds = threshold_table(cases, folder)
    thresholds.to_csv(out / "thresholds.csv", index=False)
    print("\nflag rule on the default peels (planted flagged rate, other layers flagged per faulty run, layers "
          "flagged per clean run):")
    print(thresholds.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    swept = sweep_table(cases, folder, list(sweep_names))
    if not swept.empty:
        swept.to_csv(out / "sweep.csv", index=False)
        print("\nsettings around the defaults (final checkpoint, seeds of the sweep):")
        print(swept.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"\nwrote {out}/layers.nc, cases.csv, summary.csv, thresholds.csv, table.md, detection.png"
          + (", sweep.csv" if not swept.empty else ""))
    return summary


FLOORS = (0.002, 0.005, 0.01, 0.02, 0.03)
NOISE_MULTIPLES = (1.0, 2.0)


def _planted_stats(ds: xr.Dataset, case: Any, *, floor: float = FLAG_FLOOR, noise_multiple: float = 1.0) -> dict:
    final = int(ds["step"].values[-1])
    table = ds.peel.summary(step=final, bits=float(case.bits), floor=floor, noise_multiple=noise_multiple)
    table = table.set_index("layer")
    out = dict(n_flagged=int(table["flagged"].sum()))
    if case.kind:
        out.update(rank=int(table.loc[case.layer, "rank"]), planted_flagged=bool(table.loc[case.layer, "flagged"]),
                   others_flagged=int(table["flagged"].drop(case.layer).sum()))
    return out


def sweep_table(cases: list[Any], folder: Path, names: list[str]) -> pd.DataFrame:
    """Per sweep setting: top-1 rate per fault kind, mean rank, flags on clean and faulty runs, wall time."""
    rows = []
    for name in names:
        file = name.replace(" ", "_").replace(",", "") + ".nc"
        for case in cases:
            path = folder / case.name / "sweep" / file
            if not path.exists():
                continue
            ds = peelnb.open(path)
            rows.append(dict(setting=name, case=case.name, bits=case.bits, kind=case.kind or "clean",
                             seconds=float(ds.attrs["wall_seconds"]), **_planted_stats(ds, case)))
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    out = []
    for name, group in frame.groupby("setting", sort=False):
        faulty, clean = group[group["kind"] != "clean"], group[group["kind"] == "clean"]
        row = dict(setting=name, runs=len(group), seconds=group["seconds"].mean())
        for kind, part in faulty.groupby("kind", sort=False):
            row[f"top1 {kind}"] = float((part["rank"] == 1).mean())
        row.update(mean_rank=faulty["rank"].mean(), clean_flagged=clean["n_flagged"].mean(),
                   planted_flagged=faulty["planted_flagged"].mean(), others_flagged=faulty["others_flagged"].mean())
        out.append(row)
    return pd.DataFrame(out)


def threshold_table(cases: list[Any], folder: Path) -> pd.DataFrame:
    """Flag rule settings on the suite's default peels: planted layers flagged against false flags."""
    rows = []
    for view in ("replace", "headroom"):
        for case in cases:
            ds = peelnb.open(folder / case.name / f"{view}.nc")
            for floor in FLOORS:
                for multiple in NOISE_MULTIPLES:
                    rows.append(dict(view=view, bits=case.bits, kind=case.kind or "clean", floor=floor,
                                     noise_multiple=multiple,
                                     **_planted_stats(ds, case, floor=floor, noise_multiple=multiple)))
    frame = pd.DataFrame(rows)
    keys = ["view", "bits", "floor", "noise_multiple"]
    faulty = frame[frame["kind"] != "clean"].groupby(keys).agg(
        planted_flagged=("planted_flagged", "mean"), others_flagged=("others_flagged", "mean"))
    clean = frame[frame["kind"] == "clean"].groupby(keys).agg(clean_flagged=("n_flagged", "mean"))
    by_kind = frame[frame["kind"] != "clean"].pivot_table(index=keys, columns="kind", values="planted_flagged",
                                                          aggfunc="mean").add_prefix("flagged ")
    return faulty.join(clean).join(by_kind).reset_index()
