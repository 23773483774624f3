"""Semantic segmentation downstream of the pretrained encoders: a light head on the patch tokens
of a registered `ChipEncoder` (frozen or fine-tuned) against a small U-Net trained from
scratch on the same input channels, scored by mIoU on the test split.
Modules: `config`, `data`, `models`, `metrics`, `train`, `figures`, `run`.

- Labels: a categorical modality of the store (WorldCover codes 10..100 by default). The
  classes are the codes present in the train chips, mapped to contiguous indices; nodata (0)
  and codes the train split never shows are ignored (`IGNORE`), never a class.
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
- `run_segmentation`: trains both, one MLflow run each (lineage tags, params, metrics
  `test_miou`, `test_pixel_accuracy`, `test_iou_<code>`, confusion matrix, prediction figure),
  and registers the better one as ``sarflow-segmentation`` with `log_downstream_model`.
"""
