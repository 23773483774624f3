"""Learning from label proportions (LLP): only the class proportions of bags (the chips of a
municipality, from statistics tables) are known; a chip-level model is trained so that the
weighted mean of its predictions over each bag matches the bag's proportions.

The proportions are of a categorical label the store's catalog declares (`truth_modality`,
default: the store's only categorical label; several: `--label` chooses), its classes are the
statistics' ``frac_<code>`` columns (checked against the declared codes) or, with a label raster,
the declared classes. Nothing is known by name: the task is ``llp-<label>``, registered as
``sarflow-llp-<label>``.

- `bags`: chips x bag polygons (`chip_bags`, area weights for chips on borders; bags without a
  labelled pixel are left out) and the bag x chip matrix;
- `data`: bag proportions from a statistics CSV (``<id>, frac_<code>...``: the realistic input,
  e.g. census or agricultural statistics per municipality) or aggregated from a coarse label
  raster over each polygon (`polygon_class_fractions`; its nodata: `--label-nodata`, else the
  store's declaration for the label, else the raster's own tag, else refused; codes outside the
  classes are left out and counted); chip features, pixels and fine labels of a chip store, all
  read through `chipstore.read_masked` / `iter_masked` (NaN at nodata); bags split into train and
  test bags (``split="bags"``; test chips are the chips in no training bag) or by the store's
  split (``split="store"``);
- `models`, `kdm`: ``linear`` / ``mlp`` (`InstanceClassifier`) and ``kdm`` (`KDM`) on the chip
  embeddings of the features root (or per-chip band statistics when there are none: logged as
  ``features=band-stats``), ``conv`` (`StridedConvLLP`, a strided convolution + 1x1 softmax,
  a few thousand parameters) on the pixels of the store's continuous inputs (`pixel_modalities` to choose)
  normalised with the store statistics, NaN pixels weighing nothing in a chip's proportions; its
  coarse map is also scored pixel-wise;
- `train`: the bag loss (KL, MSE or cross-entropy between predicted and known bag proportions),
  training on bag proportions only, the steps chosen on held-out training bags (whose proportion
  MAE also ranks the models), the bag-size curve;
- `metrics`: per-chip proportion MAE against fine labels, next to the baseline that predicts the
  mean proportions; `figures`: the LLP map (the declared classes' colours and names) and the
  bag-size curve;
- `run` (`run_llp(LLPConfig(store=..., tracking_uri=..., polygons=..., stats=...))`, the config
  in `config`): refuses a test set that cannot measure the task (`tasks.not_evaluable`), picks the
  model on validation bags (the first listed where they cannot choose, said so), scores the test
  chips once and registers the model as ``sarflow-llp-<label>`` with `log_downstream_model` in a
  nested run (evaluation set ``<dataset md5>:test:llp-<label>``); the result has `models` and
  `not_evaluable`. ``models:/sarflow-llp-<label>/<v>`` loaded with ``mlflow.pyfunc.load_model``
  maps raw embeddings (or raw pixels for ``conv``, NaN allowed) to class proportions (rows summing
  to 1, columns in the order of the ``sarflow.llp.classes`` tag);
- `real_case` (`run_real_case`) runs the same path on a real Sen1Floods11 chip (Kansas, county
  FIPS 20121): a catalog declaring S1 as input and the hand label (0 dry, 1 water, nodata -1) as
  label, tiled on the chip's grid, bags = the county cut into grid cells, proportions aggregated
  from the hand label raster (which has no nodata tag: the catalog's -1 is used).
"""
