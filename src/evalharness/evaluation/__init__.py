"""One evaluation: plan, prepare, the case loop, the MLflow run around them."""
