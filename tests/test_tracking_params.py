"""Issue 16: a tracking URI logged as a run parameter leaks the credentials a URI may carry."""

from sarflow.mlops.tracking import loggable_params


def test_run_parameters_leave_out_the_tracking_uri_and_mask_credentials():
    params = {"tracking_uri": "http://u:p@mlflow:5000", "registry": "postgresql+psycopg2://mlflow:hunter2@db:5432/feast",
              "store": "s3://bucket/c.zarr", "sizes": (25, 50), "note": "x" * 600}
    logged = loggable_params(params)
    assert "tracking_uri" not in logged
    assert logged["registry"] == "postgresql+psycopg2://mlflow:***@db:5432/feast"
    assert logged["store"] == "s3://bucket/c.zarr" and logged["sizes"] == "(25, 50)" and len(logged["note"]) == 500
    assert "hunter2" not in str(logged)
