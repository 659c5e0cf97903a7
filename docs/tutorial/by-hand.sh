outbox dev --env-file .outbox-dev.env &       # PostgreSQL + Tansu, until Ctrl-C / kill
while [ ! -s .outbox-dev.env ]; do sleep 0.2; done
. ./.outbox-dev.env                            # OUTBOX_DB, OUTBOX_BOOTSTRAP_SERVERS, ...
alembic upgrade head                           # the shop's tables and the outbox's
outbox relay &                                 # publishes what the app commits
outbox consume shop.projector:CustomerTotals & # joins in seconds (OUTBOX_CONSUMER_CONFIG)
uvicorn --factory shop.app:create_app &        # http://127.0.0.1:8000
