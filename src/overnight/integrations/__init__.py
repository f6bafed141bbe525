"""overnight inside pipelines: Dagster (dagster.py) and Airflow (airflow.py). Each module needs
its extra installed (`pip install overnight[dagster]`, `overnight[airflow]`)."""
