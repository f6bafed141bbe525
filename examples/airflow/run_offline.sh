#!/usr/bin/env bash
# examples/airflow, offline: an Airflow home of its own (SQLite), the fake OpenAI provider on
# port 8000, then `dag.test()` of dags/ticket_digest.py. Run it with the Airflow venv's python
# on PATH (`make setup-airflow`, then `. .venv-airflow/bin/activate`). Writes data/digest.md.
set -euo pipefail
cd "$(dirname "$0")"
export AIRFLOW_HOME="$PWD/.airflow" AIRFLOW__CORE__DAGS_FOLDER="$PWD/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False OPENAI_API_KEY="${OPENAI_API_KEY:-sk-offline}"
airflow db migrate > /dev/null
python -m overnight.testing.fake_provider --port 8000 --batch-seconds 5 &
fake=$!
trap 'kill $fake' EXIT
python dags/ticket_digest.py
cat data/digest.md
