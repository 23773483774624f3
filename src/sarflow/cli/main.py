"""The `sarflow` command line: one thin command per stage, one module per command group."""

from __future__ import annotations

import logging
import sys

import typer

from sarflow.cli import data, demo, downstream, embed, features, llp, pipeline, registry, segment, services, train

app = typer.Typer(help="sarflow: SAR + optical Earth-observation data to ML-ready chips and models.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


_handler: logging.Handler | None = None


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="log more")) -> None:
    # one handler of ours on the stderr of this invocation: a later invocation in the same process
    # (a notebook, a test) replaces it instead of logging to a stream that may have been closed
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(_handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it reports each CPU-feature build it tries


for group in (data, train, embed, registry, demo):
    for command in group.COMMANDS:
        app.command()(command)

app.add_typer(features.features_app, name="features")
app.add_typer(downstream.downstream_app, name="downstream", help="Probes on frozen embeddings, label-efficiency curves, modality ablation, region generalization.")
app.add_typer(segment.segment_app, name="segment", help="Segmentation: a head on the pretrained ViT vs a U-Net from scratch (mIoU).")
app.add_typer(llp.llp_app, name="llp", help="Learning from label proportions: bags from polygons, chip models from bag statistics.")
app.add_typer(services.services_app, name="services")
app.add_typer(pipeline.pipeline_app, name="pipeline", help="Compile, run locally (kfp.local) or submit the Kubeflow pipelines.")

if __name__ == "__main__":
    app()
