"""Glue to optional outside engines; each lives in one module and imports its engine lazily."""
