"""Semantic segmentation downstream of the pretrained encoders: a light head on the patch tokens
of a registered `ChipEncoder` (frozen or fine-tuned) against a small U-Net trained from
scratch on the same input channels, scored by mIoU on the test split.
Modules: `config`, `data`, `models`, `metrics`, `train`, `figures`, `run`.

- Labels: a categorical label the store's catalog declares (`label_modality`, default: the
  store's only categorical label). The classes are its declared codes, mapped to contiguous
  indices; nodata (masked by `chipstore.read_masked`) and codes the label does not declare are
  ignored (`IGNORE`), never a class. Figures colour the classes by their declared colours (else
  a tab20 palette) and name them by their declared names.
- Inputs: the encoder's groups, or (U-Net only) one group per input source of the store
  (`modalities` to choose; continuous sources only), read through the store's one reader.
- `ViTSegmenter`: the encoder's backbone(s) give one token per patch; the tokens of the
  groups are concatenated, reshaped to the patch grid and decoded to per-pixel logits by a
  1x1 convolution + bilinear upsampling (`head="linear"`) or a small progressive upsampler.
- `UNet`: 2-3 levels (16-32-64 channels by default), GroupNorm, from scratch.
- Both modules take what the ChipEncoder takes (chips in physical units, channels of the
  groups concatenated, NaN = missing), normalise internally and return per-pixel class
  probabilities (batch, classes, H, W); `class_codes` maps index -> code and `predict_codes`
  gives code maps. So a registered segmentation model runs on chips read from the store.
- Metrics (`confusion_matrix`, `segmentation_scores`): IoU per class = TP / (TP + FP + FN)
  over non-ignored pixels; mIoU is the mean over classes present in truth or prediction (a
  class absent from both is not counted); pixel accuracy over non-ignored pixels.
- `run_segmentation`: refuses a test split that cannot measure the task (too few chips, fewer
  than two classes with chips of their own), trains both, one MLflow run each (lineage tags,
  params, metrics `val_miou`, `test_miou`, `test_pixel_accuracy`, `test_iou_<code>`, confusion
  matrix, prediction figure), and registers the one with the better val mIoU (the default where
  val cannot measure it) as ``sarflow-segmentation-<label>`` with `log_downstream_model`; its
  evaluation set is ``<dataset md5>:test:segmentation-<label>``. The result has `models`
  ({name: version, metric, higher_is_better}) and `not_evaluable`.
"""
