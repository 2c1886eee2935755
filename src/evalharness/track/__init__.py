"""Every MLflow call: stores, runs, params, tables, figures, tags."""
