"""Well-known class legends, so a label source can say `legend: worldcover` instead of listing
its classes. Each legend maps the codes stored in the raster to a class name and a colour.

- worldcover: ESA WorldCover 10 m (2020, 2021), codes 10..100; 0 is nodata.
- corine: CORINE Land Cover 44 level-3 classes as EEA's raster GRID_CODE 1..44 (the uint8
  rasters; 48 is EEA's nodata, 255 in many clips).
- corine_clc: the same classes by their three-digit CLC code (111..523), as vector-derived rasters carry.
- igbp: MODIS MCD12Q1 LC_Type1 (IGBP), codes 1..17; 255 is fill.
"""

from __future__ import annotations

WORLDCOVER = {
    10: ("Tree cover", "#006400"), 20: ("Shrubland", "#ffbb22"), 30: ("Grassland", "#ffff4c"),
    40: ("Cropland", "#f096ff"), 50: ("Built-up", "#fa0000"), 60: ("Bare / sparse vegetation", "#b4b4b4"),
    70: ("Snow and ice", "#f0f0f0"), 80: ("Permanent water bodies", "#0064c8"), 90: ("Herbaceous wetland", "#0096a0"),
    95: ("Mangroves", "#00cf75"), 100: ("Moss and lichen", "#fae6a0"),
}

# (GRID_CODE, CLC code, name, colour): EEA's CLC legend
_CLC = [
    (1, 111, "Continuous urban fabric", "#e6004d"), (2, 112, "Discontinuous urban fabric", "#ff0000"),
    (3, 121, "Industrial or commercial units", "#cc4df2"), (4, 122, "Road and rail networks", "#cc0000"),
    (5, 123, "Port areas", "#e6cccc"), (6, 124, "Airports", "#e6cce6"), (7, 131, "Mineral extraction sites", "#a600cc"),
    (8, 132, "Dump sites", "#a64d00"), (9, 133, "Construction sites", "#ff4dff"), (10, 141, "Green urban areas", "#ffa6ff"),
    (11, 142, "Sport and leisure facilities", "#ffe6ff"), (12, 211, "Non-irrigated arable land", "#ffffa8"),
    (13, 212, "Permanently irrigated land", "#ffff00"), (14, 213, "Rice fields", "#e6e600"), (15, 221, "Vineyards", "#e68000"),
    (16, 222, "Fruit trees and berry plantations", "#f2a64d"), (17, 223, "Olive groves", "#e6a600"),
    (18, 231, "Pastures", "#e6e64d"), (19, 241, "Annual crops with permanent crops", "#ffe6a6"),
    (20, 242, "Complex cultivation patterns", "#ffe64d"), (21, 243, "Agriculture with natural vegetation", "#e6cc4d"),
    (22, 244, "Agro-forestry areas", "#f2cca6"), (23, 311, "Broad-leaved forest", "#80ff00"),
    (24, 312, "Coniferous forest", "#00a600"), (25, 313, "Mixed forest", "#4dff00"), (26, 321, "Natural grasslands", "#ccf24d"),
    (27, 322, "Moors and heathland", "#a6ff80"), (28, 323, "Sclerophyllous vegetation", "#a6e64d"),
    (29, 324, "Transitional woodland-shrub", "#a6f200"), (30, 331, "Beaches, dunes, sands", "#e6e6e6"),
    (31, 332, "Bare rocks", "#cccccc"), (32, 333, "Sparsely vegetated areas", "#ccffcc"), (33, 334, "Burnt areas", "#000000"),
    (34, 335, "Glaciers and perpetual snow", "#a6e6cc"), (35, 411, "Inland marshes", "#a6a6ff"),
    (36, 412, "Peat bogs", "#4d4dff"), (37, 421, "Salt marshes", "#ccccff"), (38, 422, "Salines", "#e6e6ff"),
    (39, 423, "Intertidal flats", "#a6a6e6"), (40, 511, "Water courses", "#00ccf2"), (41, 512, "Water bodies", "#80f2e6"),
    (42, 521, "Coastal lagoons", "#00ffa6"), (43, 522, "Estuaries", "#a6ffe6"), (44, 523, "Sea and ocean", "#e6f2ff"),
]

IGBP = {
    1: ("Evergreen needleleaf forests", "#05450a"), 2: ("Evergreen broadleaf forests", "#086a10"),
    3: ("Deciduous needleleaf forests", "#54a708"), 4: ("Deciduous broadleaf forests", "#78d203"),
    5: ("Mixed forests", "#009900"), 6: ("Closed shrublands", "#c6b044"), 7: ("Open shrublands", "#dcd159"),
    8: ("Woody savannas", "#dade48"), 9: ("Savannas", "#fbff13"), 10: ("Grasslands", "#b6ff05"),
    11: ("Permanent wetlands", "#27ff87"), 12: ("Croplands", "#c24f44"), 13: ("Urban and built-up lands", "#a5a5a5"),
    14: ("Cropland/natural vegetation mosaics", "#ff6d4c"), 15: ("Permanent snow and ice", "#69fff8"),
    16: ("Barren", "#f9ffa4"), 17: ("Water bodies", "#1c0dff"),
}

LEGENDS: dict[str, dict[int, tuple[str, str]]] = {
    "worldcover": WORLDCOVER,
    "corine": {g: (n, c) for g, _, n, c in _CLC},
    "corine_clc": {clc: (n, c) for _, clc, n, c in _CLC},
    "igbp": IGBP,
}
