"""Create and fill the `tickets` table the example enriches (PostgreSQL by default).

    python setup_tickets.py                 # 200 support tickets, and labelled.csv
    python setup_tickets.py --add 20        # 20 more tickets, as a day's new inbox

The tickets come from overnight's demo generator (realistic, noisy support mail); the true
category is not written to the table: the model finds it. `labelled.csv` (200 other tickets
with their label) is what the local model's classifier head is fitted on.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import sqlalchemy as sa

from overnight.demo.tickets import generate_tickets, write_labelled_csv

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql+psycopg://127.0.0.1:5432/test")
    parser.add_argument("--table", default="tickets", help="a name, or schema.name")
    parser.add_argument("--tickets", type=int, default=200)
    parser.add_argument("--add", type=int, default=0, help="add this many new tickets")
    args = parser.parse_args()

    engine = sa.create_engine(args.url)
    schema, _, name = args.table.rpartition(".")
    table = sa.Table(
        name,
        sa.MetaData(),
        sa.Column("ticket_id", sa.String(16), primary_key=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("customer", sa.Text),
        sa.Column("product", sa.Text),
        sa.Column("channel", sa.Text),
        sa.Column("subject", sa.Text),
        sa.Column("body", sa.Text),
        sa.Column("category", sa.Text),  # written by the job
        sa.Column("confidence", sa.Float),  # written by the job
        schema=schema or None,
    )
    with engine.begin() as conn:
        if args.add:
            have = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() or 0
            wanted = generate_tickets(have + args.add)[have:]
        else:
            table.drop(conn, checkfirst=True)
            table.create(conn)
            wanted = generate_tickets(args.tickets)
            write_labelled_csv(generate_tickets(200, seed=1007), HERE / "labelled.csv")
        conn.execute(
            table.insert(),
            [
                {
                    "ticket_id": t.ticket_id,
                    "created_at": dt.datetime.fromisoformat(t.created_at),
                    "customer": t.customer,
                    "product": t.product,
                    "channel": t.channel,
                    "subject": t.subject,
                    "body": t.body,
                }
                for t in wanted
            ],
        )
    print(f"{'added' if args.add else 'created'} {len(wanted)} tickets in {args.table}")


if __name__ == "__main__":
    main()
