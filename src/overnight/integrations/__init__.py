"""overnight inside pipelines: Dagster (dagster.py). Each module needs its extra installed
(`pip install overnight[dagster]`)."""
