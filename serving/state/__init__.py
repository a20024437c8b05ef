"""Everything the gateway keeps in a database or in Redis: every table (``tables``), the database and its
migrations, the read cache and change feed, and one store per concern (tenants, policies, the ledger,
canaries, limits, leadership).

The only room that imports SQLAlchemy, Alembic or redis.
"""
