"""Learning from label proportions (LLP): only the class proportions of bags (the chips of a
municipality, from statistics tables) are known; a chip-level model is trained so that the
weighted mean of its predictions over each bag matches the bag's proportions.

- `bags`: chips x bag polygons (`chip_bags`, area weights for chips on borders) and the bag x
  chip matrix;
- `data`: bag proportions from a statistics CSV (``<id>, frac_<class>...``: the realistic input,
  e.g. census or agricultural statistics per municipality) or aggregated from a coarse label
  raster over each polygon (`polygon_class_fractions`, rasterio masking); chip features, pixels
  and fine labels of a chip store; bags split into train and test bags (``split="bags"``; test
  chips are the chips in no training bag) or by the store's split (``split="store"``);
- `models`, `kdm`: ``linear`` / ``mlp`` (`InstanceClassifier`) and ``kdm`` (`KDM`) on the chip
  embeddings of the features root (or per-chip band statistics when there are none: logged as
  ``features=band-stats``), ``conv`` (`StridedConvLLP`, a strided convolution + 1x1 softmax,
  ~5k parameters) on the S1 + S2 pixels normalised with the store statistics (NaN -> 0), whose
  coarse map is also scored pixel-wise;
- `train`: the bag loss (KL, MSE or cross-entropy between predicted and known bag proportions),
  training on bag proportions only, the steps chosen on held-out training bags, the bag-size curve;
- `metrics`: per-chip proportion MAE against fine labels, next to the baseline that predicts the
  mean proportions; `figures`: the LLP map and the bag-size curve;
- `run` (`run_llp(LLPConfig(store=..., tracking_uri=..., polygons=..., stats=...))`, the config
  in `config`): the best model (lowest test proportion MAE) is registered as ``sarflow-<task>``
  with `log_downstream_model` in a nested run; ``models:/sarflow-llp-landcover/<v>`` loaded with
  ``mlflow.pyfunc.load_model`` maps raw embeddings (or raw pixels for ``conv``) to class
  proportions (rows summing to 1, columns in the order of the ``sarflow.llp.classes`` tag);
- `real_case` (`run_real_case`) runs the same models on a real Sen1Floods11 chip (Kansas, county
  FIPS 20121): water vs dry from S1 only, with bags = the county cut into grid cells and bag
  proportions aggregated from the hand label raster.
"""
