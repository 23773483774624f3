"""MLOps around every stage: MLflow tracking, the lineage every run carries, the registry and
its promotion gate, the Kubeflow runner (compile, run with kfp.local, submit)."""
