"""Bad inputs an operator may give: each is refused with a message naming the input and the
cause (an InputError, or a non-zero exit and one line from the CLI), never a traceback or a
silent success."""

from __future__ import annotations

import pandas as pd
import pytest

from sarflow.errors import InputError


# --- LLP statistics whose proportions are not proportions ------------------------------------

def _llp_cfg(tiny_scene, tiny_store, stats):
    from sarflow.downstream.llp.config import LLPConfig

    return LLPConfig(store=str(tiny_store), polygons=str(tiny_scene.parent / "municipalities.geojson"),
                     stats=str(stats), register=False)


@pytest.mark.parametrize("change, cause", [
    ("triple", r"do not sum to 1 .*\(sum 3\)"),
    ("negative", r"negative proportion.*frac_"),
    ("half", r"do not sum to 1 .*\(sum 0\.5\)"),
])
def test_llp_statistics_that_are_not_proportions_are_refused(tiny_scene, tiny_store, tmp_path, change, cause):
    from sarflow.downstream.llp.data import prepare_store_data

    stats = pd.read_csv(tiny_scene.parent / "municipality_stats.csv", dtype={"muni_id": str})
    fracs = [c for c in stats.columns if c.startswith("frac_")]
    bad_id = stats.muni_id.iloc[1]
    if change == "triple":
        stats.loc[1, fracs] = stats.loc[1, fracs] * 3
    elif change == "negative":
        stats.loc[1, fracs[0]] = -0.25
    else:
        stats.loc[1, fracs] = stats.loc[1, fracs] * 0.5
    path = tmp_path / f"{change}.csv"
    stats.to_csv(path, index=False)
    with pytest.raises(InputError, match=cause) as e:
        prepare_store_data(_llp_cfg(tiny_scene, tiny_store, path))
    assert e.value.where == str(path) and bad_id in e.value.cause


def test_llp_statistics_within_tolerance_or_empty_are_accepted(tmp_path):
    from sarflow.downstream.llp.data import check_proportions

    df = pd.DataFrame({"id": ["a", "b", "c"], "frac_0": [0.5, float("nan"), 0.0],
                       "frac_1": [0.505, float("nan"), 0.0]})
    check_proportions(df, "id", "s.csv")  # 1.005 is within the tolerance; empty rows are no bag
    with pytest.raises(InputError, match="a \\(sum 1.005\\)"):
        check_proportions(df, "id", "s.csv", tolerance=1e-3)
