"""The `sarflow` command line: one thin command per stage, one module per command group."""

from __future__ import annotations

import logging
import sys

import typer

from sarflow.cli import (data, demo, downstream, embed, features, integrity, llp, pipeline, registry, segment, services,
                         train)

class _App(typer.Typer):
    """The command line: a file system error that no stage turned into a message (an output folder
    that cannot be written, a disk full, a path under a file) ends it with one line naming the
    path and the cause, exit status 2, instead of a traceback."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except OSError as e:
            if e.filename is None or e.strerror is None:
                raise
            where = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
            typer.secho(f"error: {where}: {e.strerror}", fg="red", err=True)
            sys.exit(2)


app = _App(help="sarflow: SAR + optical Earth-observation data to ML-ready chips and models.",
           no_args_is_help=True, pretty_exceptions_enable=False)


class _StderrHandler(logging.StreamHandler):
    """Writes to the `sys.stderr` of the moment: a later invocation in the same process (a
    notebook, a script calling the app twice) never logs to a stream an earlier one closed."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="log more")) -> None:
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig: a host that configured logging keeps its handlers
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it reports each CPU-feature build it tries


for group in (data, integrity, train, embed, registry, demo):
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
