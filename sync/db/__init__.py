"""The database layer: every SQL statement of the project, one module per table or concern, as named
functions over a SQLAlchemy ``Connection`` whose transaction the caller owns."""
