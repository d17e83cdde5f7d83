"""stsync: two-way sync between a PostgreSQL mirror and ServiceTitan CRM v2 customers and locations."""

__version__ = "0.1.0"
